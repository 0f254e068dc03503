"""Preference losses: one signature, one registry, per-pair loss + metrics.

    per_pair_loss, metrics = PREFERENCE_LOSSES.get(name)(
        chosen_rewards, rejected_rewards, *, beta=1.0, margin=None)

    chosen_rewards    (B,)  r(x, y_w): the model's score of the chosen completion, with grad
    rejected_rewards  (B,)  r(x, y_l): the same for the rejected completion, with grad
    beta              float  scale of the reward difference (1 for a reward model)
    margin            (B,) tensor, float or None: a gap the chosen reward should exceed the rejected one by
    -> per_pair_loss (B,) (reduce it with `.mean()`); metrics: dict of detached scalars over this batch.

What a "reward" is depends on the model being trained, not on the loss, so the recipe computes it once
and the loop looks the loss up by name without branching on it (`PREFERENCE_SPECS` says, per loss, which
reward its paper uses and its default beta and margin; `implicit_rewards` computes it):

    reward model        r = r_phi(x, y), the scalar head's output on the last token
    DPO, IPO            r = log pi_theta(y|x) - log pi_ref(y|x), summed over the response tokens
                        (DPO's implicit reward without its beta; beta is passed to the loss)
    SLiC-HF             r = log pi_theta(y|x): the sequence log-likelihood, no reference
    SimPO               r = log pi_theta(y|x) / |y|: reference-free and length-normalised

and each loss is a function of h = r_w - r_l (w: chosen, l: rejected):

    bradley_terry       -log sigmoid(beta h - margin)
    dpo                 -log sigmoid(beta h - margin)                  (margin 0: DPO; > 0: an offset)
    ipo                 (h - 1 / (2 beta))^2                            (margin unused)
    slic                max(0, margin - beta h)                         (margin = delta)
    simpo               -log sigmoid(beta h - margin), margin = gamma

DPO, SimPO and Bradley-Terry share the logistic form and differ only in the reward they are given.
Every function takes all four arguments, ignoring those it does not use, so the registry keeps one
signature. Losses are computed in at least float32 (bf16 rewards are upcast first).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _logistic(chosen_rewards: Tensor, rejected_rewards: Tensor, beta: float,
              margin: Tensor | float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """-log sigmoid(beta h - margin) per pair, with the shared metrics."""
    gap, margin = _reward_gap(chosen_rewards, rejected_rewards, margin)
    return -F.logsigmoid(beta * gap - margin.detach()), _pair_metrics(chosen_rewards, rejected_rewards)


@PREFERENCE_LOSSES.register("dpo")
def dpo(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float = 1.0,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization, the sigmoid loss (Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", eq. 7):

        r = log pi_theta(y|x) - log pi_ref(y|x)          (summed over the response tokens)
        loss = -log sigmoid(beta (r_w - r_l) - margin)

    beta is the KL coefficient of the RLHF objective the loss solves in closed form (DPO: 0.1 to 0.5);
    beta r is the implicit reward. A margin > 0 is the offset of ODPO (Amini et al. 2024); the paper's
    DPO has none. d loss / d r_w = -beta sigmoid(-(beta h - margin)): pairs the policy already ranks by a
    wide margin stop contributing, ranked-wrong pairs count most.

    Args:
        chosen_rewards, rejected_rewards: (B,) log-ratios r_w and r_l (with grad through log pi_theta).
        beta: KL coefficient. margin: (B,), float or None (0).
    Returns:
        per_pair_loss (B,); metrics: accuracy (r_w > r_l), margin (mean r_w - r_l), chosen_reward,
        rejected_reward (means of r, without beta).
    """
    return _logistic(chosen_rewards, rejected_rewards, beta, margin)


@PREFERENCE_LOSSES.register("ipo")
def ipo(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float = 1.0,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", eq. 17), with beta as the paper's tau:

        r = log pi_theta(y|x) - log pi_ref(y|x)          (summed over the response tokens)
        loss = (r_w - r_l - 1 / (2 beta))^2

    A squared loss that regresses the log-ratio gap to the finite target 1 / (2 beta) instead of pushing
    it to infinity, so deterministic preferences do not drive the policy arbitrarily far from pi_ref
    (DPO's overfitting failure). `margin` is unused.

    Args:
        chosen_rewards, rejected_rewards: (B,) log-ratios r_w and r_l. beta: tau > 0 (target 1 / (2 tau)).
    Returns:
        per_pair_loss (B,); metrics as `dpo`.
    """
    gap, _ = _reward_gap(chosen_rewards, rejected_rewards, None)
    return (gap - 1.0 / (2.0 * beta)) ** 2, _pair_metrics(chosen_rewards, rejected_rewards)


@PREFERENCE_LOSSES.register("slic")
def slic(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float = 1.0,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The calibration loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback", eq. 1), a hinge on the sequence log-likelihood gap:

        r = log pi_theta(y|x)                           (summed over the response tokens, no reference)
        loss = max(0, delta - beta (r_w - r_l)),   delta = margin (SLiC-HF: beta = 1, delta = 1)

    SLiC-HF adds a regulariser -lambda log pi_theta(y_ref|x) on a target sequence (here the chosen
    completion); that term is the SFT loss, which the recipe adds with its own coefficient
    (`dpo.sft_coef`), not part of this per-pair loss. The gradient is -beta on r_w (+beta on r_l) while
    beta h < delta and 0 after: pairs separated by delta stop moving.

    Args:
        chosen_rewards, rejected_rewards: (B,) log-likelihoods (or log-ratios). beta: scale of the gap.
        margin: delta, (B,), float or None (0).
    Returns:
        per_pair_loss (B,); metrics as `dpo`.
    """
    gap, margin = _reward_gap(chosen_rewards, rejected_rewards, margin)
    return torch.relu(margin.detach() - beta * gap), _pair_metrics(chosen_rewards, rejected_rewards)


@PREFERENCE_LOSSES.register("simpo")
def simpo(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float = 1.0,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6):

        r = log pi_theta(y|x) / |y|                     (mean over the response tokens, no reference)
        loss = -log sigmoid(beta (r_w - r_l) - gamma),  gamma = margin

    The reward is the average log-likelihood, the quantity generation ranks by, so no reference model is
    needed and long responses gain nothing from length; gamma > 0 is a target reward margin (SimPO's
    settings: beta 2 to 2.5, gamma 0.3 to 1.6).

    Args:
        chosen_rewards, rejected_rewards: (B,) length-normalised log-likelihoods. beta: scale.
        margin: gamma, (B,), float or None (0).
    Returns:
        per_pair_loss (B,); metrics as `dpo`.
    """
    return _logistic(chosen_rewards, rejected_rewards, beta, margin)


@dataclass(frozen=True)
class PreferenceSpec:
    """What a preference loss compares, as its paper defines it, and the paper's default settings."""

    use_reference: bool  # r includes - log pi_ref(y|x)
    length_normalize: bool  # r is divided by the number of response tokens |y| (EOS included)
    beta: float
    margin: float  # DPO's offset, SLiC's delta, SimPO's gamma (unused by IPO)
    sft_coef: float  # weight of the SFT regulariser -log pi_theta(y_w|x) / |y_w| the recipe adds


PREFERENCE_SPECS: dict[str, PreferenceSpec] = {
    "dpo": PreferenceSpec(use_reference=True, length_normalize=False, beta=0.1, margin=0.0, sft_coef=0.0),
    "ipo": PreferenceSpec(use_reference=True, length_normalize=False, beta=0.1, margin=0.0, sft_coef=0.0),
    "slic": PreferenceSpec(use_reference=False, length_normalize=False, beta=1.0, margin=1.0, sft_coef=0.1),
    "simpo": PreferenceSpec(use_reference=False, length_normalize=True, beta=2.0, margin=1.0, sft_coef=0.0),
}


def implicit_rewards(logprobs: Tensor, response_mask: Tensor, ref_logprobs: Tensor | None = None, *,
                     length_normalize: bool = False) -> Tensor:
    """The reward a policy-trained preference loss compares, per sequence:

        r_i = sum_t m_{i,t} (logprobs_{i,t} - ref_logprobs_{i,t})  [/ sum_t m_{i,t} when length_normalize]

    Args:
        logprobs: (B, T) log pi_theta(y_t | x, y_<t), with grad. response_mask: (B, T) {0, 1}.
        ref_logprobs: (B,) summed reference log-probs log pi_ref(y|x) (computed once, no grad), or
            (B, T) per token, or None for a reference-free reward.
    Returns:
        (B,) rewards in at least float32.
    """
    m = response_mask.to(torch.promote_types(logprobs.dtype, torch.float32))
    r = (logprobs * m).sum(-1)
    if ref_logprobs is not None:
        ref = ref_logprobs.to(r.dtype)
        r = r - (ref * m).sum(-1) if ref.dim() == 2 else r - ref
    if length_normalize:
        r = r / m.sum(-1).clamp(min=1.0)
    return r
