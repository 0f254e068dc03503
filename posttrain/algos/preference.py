"""Preference losses: one signature, one registry, per-pair loss + metrics.

    per_pair_loss, metrics = PREFERENCE_LOSSES.get(name)(
        chosen_rewards, rejected_rewards, *, beta=1.0, margin=None)

    chosen_rewards    (B,)  r(x, y_w): the model's score of the chosen completion, with grad
    rejected_rewards  (B,)  r(x, y_l): the same for the rejected completion, with grad
    beta              float  scale of the reward difference (1 for a reward model)
    margin            (B,) tensor, float or None: a gap the chosen reward should exceed the rejected one by
    -> per_pair_loss (B,) (reduce it with `.mean()`); metrics: dict of detached scalars over this batch.

What a "reward" is depends on the model being trained, not on the loss, so the recipe computes it once
and the loop looks the loss up by name without branching on it:

    reward model        r = r_phi(x, y), the scalar head's output on the last token
    DPO, IPO, SLiC      r = log pi_theta(y|x) - log pi_ref(y|x), summed over the response tokens
                        (DPO's implicit reward without its beta; beta is passed to the loss)
    SimPO               r = log pi_theta(y|x) / |y|: reference-free and length-normalised

and each loss is a function of h = r_w - r_l (w: chosen, l: rejected):

    bradley_terry       -log sigmoid(beta h - margin)                  (implemented)
    dpo                 -log sigmoid(beta h)                           (a later issue)
    ipo                 (h - 1 / (2 beta))^2                            (a later issue)
    slic                max(0, margin - beta h)                        (a later issue)
    simpo               -log sigmoid(beta h - margin), margin = gamma   (a later issue)

Every function takes all four arguments, ignoring those it does not use, so the registry keeps one
signature. Losses are computed in at least float32 (bf16 rewards are upcast first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

PREFERENCE_LOSSES = Registry("preference loss")


def _reward_gap(chosen_rewards: Tensor, rejected_rewards: Tensor,
                margin: Tensor | float | None) -> tuple[Tensor, Tensor]:
    """(h = r_w - r_l, margin) as (B,) tensors in at least float32, after checking the shapes.

    Shapes are checked rather than broadcast: rewards of shape (B, 1) against a margin of shape (B,)
    would silently broadcast to a (B, B) loss.
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards and rejected_rewards must both have shape (B,); got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    gap = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is None:
        return gap, torch.zeros_like(gap)
    margin = torch.as_tensor(margin, dtype=dtype, device=gap.device)
    if margin.shape not in ((), gap.shape):
        raise ValueError(f"margin must be a float or have shape {tuple(gap.shape)}; got {tuple(margin.shape)}")
    return gap, margin.expand_as(gap)


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """accuracy = mean(r_w > r_l) (a tie counts as wrong), margin = mean(r_w - r_l), and the mean chosen
    and rejected rewards, all over the rewards as given (no beta, no margin argument)."""
    with torch.no_grad():
        chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
        return {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
        }


@PREFERENCE_LOSSES.register("bradley_terry")
def bradley_terry(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float = 1.0,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pairwise loss for a reward model (Bradley & Terry 1952; Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback", eq. 1), with the per-pair
    margin of Llama 2 (Touvron et al. 2023, eq. 2):

        P(y_w > y_l | x) = sigmoid(r_w - r_l)
        loss = -log sigmoid(beta (r_w - r_l) - margin)

    computed with `F.logsigmoid`, which is exact and finite for any gap (a naive log(sigmoid(h)) is
    -inf once sigmoid underflows at h < -100 or so in float32). The gradient is
    d loss / d r_w = -beta sigmoid(-(beta h - margin)) < 0: minimising it raises the chosen reward and
    lowers the rejected one. Its size is at least beta / 2 until beta h exceeds the margin, so a margin
    m > 0 keeps pushing pairs whose gap is already positive but below m / beta.

    Args:
        chosen_rewards, rejected_rewards: (B,) rewards of the chosen and rejected completions.
        beta: scale of the gap; 1 for a reward model (DPO uses this loss on log-ratios with beta ~ 0.1).
        margin: (B,) tensor or float, the required gap (Llama 2: larger for more decisive human
            ratings), or None for 0. Treated as a constant.
    Returns:
        per_pair_loss (B,) in at least float32; metrics: accuracy (fraction of pairs with r_w > r_l),
        margin (mean r_w - r_l), chosen_reward, rejected_reward (means).
    """
    gap, margin = _reward_gap(chosen_rewards, rejected_rewards, margin)
    loss = -F.logsigmoid(beta * gap - margin.detach())
    return loss, _pair_metrics(chosen_rewards, rejected_rewards)
