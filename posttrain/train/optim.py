"""The optimizer, its schedule, the guarded (non-finite-skipping) step, and the phase timer every loop uses."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch


def make_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                   min_ratio: float = 1.0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up, then cosine decay to `min_ratio * lr` (min_ratio=1: constant).

    The fused implementation (one kernel over all parameters) where every parameter is a float tensor on one
    device: on this CPU it steps a 1M-parameter model in ~0.7 ms against foreach's ~2.6-4.5 ms (issue 8)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = len({p.device.type for p in params}) == 1 and all(p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class PhaseTimer:
    """Accumulates wall time per named phase: `with timer("generate"): ...`; `pop()` returns and resets. Where CUDA
    is in use, each phase ends with torch.cuda.synchronize(), so kernels a phase queued count in it, not the next."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def guarded_step(model, optimizer, loss: torch.Tensor, grad_clip: float) -> tuple[torch.Tensor, bool]:
    """Backward `loss`, clip the gradient norm, and step only when the loss and the norm are finite (a non-finite
    step is skipped; the caller logs it and `RunControl.record_step` counts it). Returns (grad_norm, stepped)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    return grad_norm, finite


def clipped_step(model, optimizer, grad_clip: float, loss: float) -> tuple[float, bool]:
    """Clip the accumulated gradient and step; a non-finite loss or gradient norm skips the step (the gradients
    are dropped either way). -> (norm, stepped)"""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok
