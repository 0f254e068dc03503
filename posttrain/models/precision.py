"""Compute precision (`model.dtype`): float32, or bfloat16 mixed precision with float32 master weights.

    with precision(cfg.model):     # every command runs inside this (posttrain/cli.py)
        ...                        # matmuls and linears in bf16 (torch.autocast), weights, gradients and
                                   # optimizer state in float32

bfloat16 is autocast, not a cast of the model: the optimizer updates float32 weights (a bf16 weight would
lose updates smaller than 2^-8 of its value), and the loss, softmax and log-probabilities are computed in
float32 from bf16 logits. Generation casts its fused weights to bf16 once per call (posttrain.models.lean),
so a decode step reads half the bytes. 'auto' is bfloat16 where the hardware computes it natively (a CUDA
device with bf16, or a CPU with AMX or AVX512-BF16, which oneDNN uses), else float32.

With bf16 the sampler's log-probabilities come from the decode path and differ from the training forward's
by bf16 rounding, so the RL loop takes log pi_old from the training forward (`recompute_old_logprobs`), which
keeps the first-minibatch ratio check exact: the first minibatch's from its own update forward, detached (the
weights have not changed yet, so a separate pass would give the same numbers), the others' from a pass before
the first optimizer step (posttrain/rl/learner.py). On a CPU the training attention runs in float32 (SDPA's
bf16 backward is slower there) and the head's log-probs keep their written-out gradient with W cast once per
block (posttrain/models/logprobs.py, `autocast_head`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from posttrain.config import ModelConfig


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AMX or AVX512-BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype matmuls run in, as model.dtype says ('auto' resolved on this machine)."""
    if cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def recompute_old_logprobs(cfg: ModelConfig) -> bool:
    """Whether the RL loop recomputes log pi_old with the training forward (reduced precision)."""
    return compute_dtype(cfg) != torch.float32


@contextmanager
def precision(cfg: ModelConfig):
    """Autocast to model.dtype's compute dtype on the CPU and, where there is one, the GPU; nothing for float32."""
    dtype = compute_dtype(cfg)
    low = dtype != torch.float32
    # cache_enabled=False: autocast caches the bf16 copy of every leaf weight until the outermost autocast region
    # ends, and this region spans the whole run, so with the cache on every forward after an optimizer step would
    # still read the starting weights (their float32 masters updated, the casts never refreshed)
    with torch.autocast("cpu", dtype=dtype, enabled=low, cache_enabled=False), \
            torch.autocast("cuda", dtype=dtype, enabled=low and torch.cuda.is_available(), cache_enabled=False):
        yield dtype
