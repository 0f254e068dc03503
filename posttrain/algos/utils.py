"""Masked reductions shared by the algorithm modules.

Masks are (B, T) tensors of {0, 1} (float) or bool; they are read as bool, so entries outside the mask
never enter a result, even if they hold inf or NaN (padding logprobs often do).
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool(mask: Tensor) -> Tensor:
    """`mask` as a bool tensor (nonzero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with every entry outside `mask` set to 0 (NaN/inf included). Zero garbage *before* arithmetic:
    0 * NaN in a backward pass is NaN, a `where` is not."""
    return torch.where(as_bool(mask), x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the entries where `mask` is set.

    mean = sum_{t: m_t=1} x_t / max(sum_t m_t, 1)   (an empty mask gives 0, not NaN)

    Args:
        x: (B, T) or any shape.
        mask: same shape as `x`, {0, 1} or bool.
        dim: reduce this dimension only; None reduces everything to a scalar.
    Returns:
        scalar if dim is None, else `x` with `dim` reduced.
    """
    m = as_bool(mask)
    total = zero_outside(x, m)
    count = m.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to zero mean and unit variance over the valid entries.

    mu = masked_mean(x),  var = masked_mean((x - mu)^2)   (population variance, divides by N as in
    OpenRLHF's advantage normalisation; verl's masked_whiten uses the unbiased N-1 instead)
    out = (x - mu) / sqrt(var + eps)  (+ mu again if not shift_mean)

    Args:
        x: (B, T).
        mask: (B, T) {0, 1} or bool.
        shift_mean: if False the mean is added back (scale only).
        eps: added to the variance.
    Returns:
        (B, T), zero outside the mask.
    """
    m = as_bool(mask)
    mu = masked_mean(x, m)
    var = masked_mean((x - mu) ** 2, m)
    out = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return zero_outside(out, m)
