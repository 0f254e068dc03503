"""Two ops of the lean forward with hand-written backward passes that keep only their inputs.

Autograd's own graph for these keeps intermediate results that are cheap to recompute: `F.rms_norm` runs as
pow / mean / rsqrt / mul / mul and keeps its normalised output (C floats per token) besides its input, and
`F.silu(gate) * up` keeps silu(gate) (I numbers per token) besides gate and up. With 2 norms and one MLP per
layer that is 2 C float32 + I bf16 values per token and layer that need not be kept: on SmolLM2-135M
(C 576, I 1536) 7.7 KB of the ~22 KB a response token keeps per layer under bf16 autocast, counted with
`saved_tensors_hooks`. These functions keep the input alone and recompute the rest in the backward pass (a few
elementwise ops; no matmul).

Forward values are bit-identical to the plain ops (the same calls run); gradients equal autograd's to float
rounding (tests/models/test_lean_ops.py checks both against the plain ops and with gradcheck in float64). Without
autograd (decoding, no-grad passes) the plain ops run.

Shapes: x (..., C), weight (C,); gate_up (..., 2 I) -> (..., I).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _RMSNorm(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension, computed in x's dtype (float32 for the residual
    stream). Backward, with r = rsqrt(mean(x^2) + eps), n = x r, g' = dy * w:
        dw = sum over rows of dy * n,    dx = r (g' - n mean(g' n)).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.size(-1),), weight, eps)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        n = xf * r
        dyf = dy.float()
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dyf * n).reshape(-1, n.size(-1)).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * weight.float()
            dx = (r * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """F.rms_norm(x, (C,), weight, eps), keeping only x for the backward pass under autograd."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class _SwiGLU(torch.autograd.Function):
    """y = silu(g) * u for gate_up = [g | u] split in halves on the last dimension. Backward, with s = sigmoid(g):
        du = dy silu(g),    dg = dy u s (1 + g (1 - s)),
    computed in float32 and returned in gate_up's dtype."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy: Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.float().chunk(2, dim=-1)
        dyf = dy.float()
        out = torch.empty(gate_up.shape, dtype=gate.dtype, device=gate_up.device)  # float32 (float64 stays)
        d_gate, d_up = out.chunk(2, dim=-1)  # written in place: no torch.cat of the two halves
        s = torch.sigmoid(gate)
        torch.mul(gate, s, out=d_up)  # silu(g)
        # silu'(g) = s (1 + g (1 - s)) = s + silu(g) (1 - s)
        slope = torch.addcmul(s, d_up, 1 - s)
        torch.mul(dyf, up, out=d_gate).mul_(slope)
        d_up.mul_(dyf)
        return out.to(gate_up.dtype)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up = [gate | up], keeping only gate_up for the backward pass under autograd."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
