"""Value (critic) losses: one signature, one registry.

    per_token_loss, metrics = VALUE_LOSSES.get(name)(values, old_values, returns, response_mask, *, clip_eps=0.2)

    values         (B, T)  V_phi(s_t), with grad
    old_values     (B, T)  V_old(s_t) from the rollout, no grad
    returns        (B, T)  R_t targets (e.g. GAE returns), no grad
    response_mask  (B, T)  {0, 1} float or bool
    -> per_token_loss (B, T), zero outside the mask; metrics: {"vf_clip_frac": scalar}.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry
from .utils import as_bool, masked_mean, zero_outside

VALUE_LOSSES = Registry("value loss")


@VALUE_LOSSES.register("clipped")
def clipped(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, *, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 baselines; Andrychowicz et al. 2021, "What Matters in On-Policy RL", sec. 3.2):

        V_clip = clip(V, V_old - eps, V_old + eps)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Args:
        values, old_values, returns, response_mask: (B, T). clip_eps: absolute band around V_old.
    Returns:
        per_token_loss (B, T); vf_clip_frac = fraction of valid tokens where the clipped term is larger.
    """
    m = as_bool(response_mask)
    values, old_values, returns = (zero_outside(x, m) for x in (values, old_values, returns))
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (v_clip - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    frac = masked_mean((clipped_sq > unclipped_sq).to(values.dtype), m).detach()
    return zero_outside(loss, m), {"vf_clip_frac": frac}


@VALUE_LOSSES.register("unclipped")
def unclipped(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, *, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Squared error: loss_t = 0.5 * (V - R)^2. old_values and clip_eps are unused; vf_clip_frac is 0.

    Args / Returns: as `clipped`.
    """
    m = as_bool(response_mask)
    values, returns = zero_outside(values, m), zero_outside(returns, m)
    loss = 0.5 * (values - returns) ** 2
    return zero_outside(loss, m), {"vf_clip_frac": values.new_zeros(())}
