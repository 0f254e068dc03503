"""Advantage estimators: one signature, one registry.

Every estimator is called as

    advantages, returns = ADVANTAGES.get(name)(
        token_rewards, response_mask, *, values=None, group_ids=None, baseline_rewards=None,
        scores=None, loss_mask=None, gamma=1.0, lam=1.0, eps=1e-6)

    token_rewards     (B, T)  reward of each response token (an outcome reward sits on the last one; with the KL
                              in the reward, -beta KL_t on every token)
    response_mask     (B, T)  {0, 1} float or bool: 1 on the tokens that get credit (the policy's own tokens)
    values            (B, T)  V(s_t) from the critic (gae only)
    group_ids         (B,)    long: responses to the same prompt share an id (grpo, dr_grpo, rloo,
                              reinforce_pp_baseline)
    baseline_rewards  (B,)    reward of the greedy rollout of the same prompt (remax)
    scores            (B,)    each response's outcome score, without any KL penalty (reinforce_pp_baseline)
    loss_mask         (B, T)  the tokens the loss trains on, a subset of response_mask (DAPO's overlong
                              filter clears truncated rows); the batch whitening of reinforce_pp and
                              reinforce_pp_baseline takes its statistics over these. None: response_mask
    -> advantages (B, T), returns (B, T): both zero outside the mask, no grad.

Outcome-reward (critic-free) estimators reduce the rewards to a sequence score
r_i = sum_t token_rewards[i, t] * mask[i, t], compute one advantage per sequence and broadcast it over
the response tokens; their `returns` equal their `advantages`. Rewards outside the mask are ignored.

A group of size 1 has mean 0 and std 1 (verl's convention), so its advantage is r_i (grpo: r_i/(1+eps)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry
from .utils import as_bool, masked_whiten, zero_outside

ADVANTAGES = Registry("advantage estimator")



def _require(name: str, arg: str, value: Tensor | None) -> Tensor:
    if value is None:
        raise ValueError(f"advantage estimator {name!r} requires {arg!r}")
    return value


def _seq_score(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """r_i = sum over response tokens of token_rewards. (B, T) -> (B,)"""
    return zero_outside(token_rewards, mask).sum(-1)


def _broadcast(seq_adv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) per-sequence advantage -> (advantages, returns), both (B, T), zero outside the mask."""
    adv = zero_outside(seq_adv[:, None].expand(mask.shape), mask)
    return adv, adv.clone()


def _group_stats(r: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (count, sum, mean, unbiased std) of its group; mean 0 and std 1 for groups of size 1.

    r: (B,), group_ids: (B,) any integer ids.  Returns four (B,) tensors.
    """
    if group_ids.shape != r.shape:
        raise ValueError(f"group_ids must have shape {tuple(r.shape)}, got {tuple(group_ids.shape)}")
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, inv, torch.ones_like(r))[inv]
    total = zeros.index_add(0, inv, r)[inv]
    mean = total / count
    sq = zeros.index_add(0, inv, (r - mean) ** 2)[inv]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # unbiased, like torch.std
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return count, total, mean, std


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16), right to left over the response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last response token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}      (A after the last response token = 0)
                = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}
        returns_t = A_t + V_t

    "t+1" is the next *response* token: responses may be left-aligned with trailing padding, of varying
    lengths, or have masked holes (e.g. tool output in a multi-turn rollout), which are skipped as verl does.

    Args:
        rewards: (B, T) r_t (PPO-RLHF: -beta * KL_t, plus the reward model's score on the last token).
        values: (B, T) V(s_t) from the critic at the rollout.
        mask: (B, T) {0, 1} or bool: 1 on response tokens.
        gamma, lam: discount and GAE lambda.
    Returns:
        advantages (B, T), returns (B, T); zero outside the mask, no grad.
    """
    m = as_bool(mask)
    r = zero_outside(rewards, m)
    v = zero_outside(values.to(r.dtype), m)
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[:, 0])
    next_a = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        mt = m[:, t]
        adv[:, t] = zero_outside(a, mt)
        next_v = torch.where(mt, v[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    return adv, zero_outside(adv + v, m)


@ADVANTAGES.register("gae", requires=("values",))
def gae_estimator(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """`gae` under the registry signature: values (B, T) are required; see `gae` for the equations."""
    return gae(token_rewards, _require("gae", "values", values), response_mask, gamma=gamma, lam=lam)


@ADVANTAGES.register("grpo", requires=("group_ids",))
@torch.no_grad()
def grpo(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO group-normalised outcome advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):

        A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)

    std is the unbiased sample std (torch.std, N-1), as in DeepSeekMath/verl. A group of size 1 uses
    mean 0 and std 1 (verl), giving A_i = r_i / (1 + eps).

    Args:
        token_rewards: (B, T); response_mask: (B, T); group_ids: (B,) long, required.
    Returns:
        advantages (B, T) = returns (B, T), A_i broadcast over response tokens, zero outside the mask.
    """
    group_ids = _require("grpo", "group_ids", group_ids)
    m = as_bool(response_mask)
    r = _seq_score(token_rewards, m)
    _, _, mean, std = _group_stats(r, group_ids)
    return _broadcast((r - mean) / (std + eps), m)


@ADVANTAGES.register("dr_grpo", requires=("group_ids",))
@torch.no_grad()
def dr_grpo(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO outcome advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO
    without the std division, which biases towards low-variance (too easy / too hard) groups:

        A_i = r_i - mean_{j in g(i)} r_j        (group of size 1: mean 0)

    Pair it with aggregation "seq-mean-token-sum-norm" to also drop GRPO's 1/|o_i| length bias.

    Args:
        token_rewards: (B, T); response_mask: (B, T); group_ids: (B,) long, required.
    Returns:
        advantages (B, T) = returns (B, T), zero outside the mask.
    """
    group_ids = _require("dr_grpo", "group_ids", group_ids)
    m = as_bool(response_mask)
    r = _seq_score(token_rewards, m)
    _, _, mean, _ = _group_stats(r, group_ids)
    return _broadcast(r - mean, m)


@ADVANTAGES.register("rloo", requires=("group_ids",))
@torch.no_grad()
def rloo(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"):

        A_i = r_i - 1/(G-1) * sum_{j in g(i), j != i} r_j

    A group of size 1 has no other sample: baseline 0, A_i = r_i (as verl).

    Args:
        token_rewards: (B, T); response_mask: (B, T); group_ids: (B,) long, required.
    Returns:
        advantages (B, T) = returns (B, T), zero outside the mask.
    """
    group_ids = _require("rloo", "group_ids", group_ids)
    m = as_bool(response_mask)
    r = _seq_score(token_rewards, m)
    count, total, _, _ = _group_stats(r, group_ids)
    baseline = torch.where(count > 1, (total - r) / (count - 1).clamp(min=1), torch.zeros_like(r))
    return _broadcast(r - baseline, m)


def _reinforce_pp(token_rewards: Tensor, response_mask: Tensor, baseline: Tensor | None, loss_mask: Tensor | None,
                  gamma: float, eps: float) -> tuple[Tensor, Tensor]:
    """G_t (minus a per-row baseline (B,)), whitened with the statistics of the loss mask's tokens (B, T); zero
    outside the loss mask."""
    m = as_bool(response_mask)
    r = zero_outside(token_rewards, m)
    returns, _ = gae(r, torch.zeros_like(r), m, gamma=gamma, lam=1.0)  # G_t: V = 0, lambda = 1
    a = returns if baseline is None else returns - baseline[:, None].to(r.dtype)
    adv = masked_whiten(a, m if loss_mask is None else m & as_bool(loss_mask), eps=eps)
    return adv, adv.clone()


@ADVANTAGES.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"): the discounted return-to-go, normalised over the whole batch.

        G_{i,t} = sum_{s >= t} gamma^(s - t) r_{i,s}          (s over the response tokens of sequence i)
        A_{i,t} = (G_{i,t} - mu) / sqrt(var + eps)

    mu and var are the mean and population variance of G over the trained tokens of the batch (`loss_mask`;
    each sequence weighted by its length), as OpenRLHF's global advantage normalisation; see `masked_whiten`.
    With an outcome reward only (on the last token) and gamma = 1, G_{i,t} = r_i for every t; with
    per-token KL penalties in the reward (kl_placement "reward", the paper's setting) G_{i,t} sums only
    the penalties from t on. `group_ids` is ignored: see `reinforce_pp_baseline`.

    Args:
        token_rewards: (B, T); response_mask: (B, T); loss_mask: (B, T) or None; gamma: discount.
    Returns:
        advantages (B, T) = returns (B, T), zero outside the mask.
    """
    return _reinforce_pp(token_rewards, response_mask, None, loss_mask, gamma, eps)


@ADVANTAGES.register("reinforce_pp_baseline", requires=("group_ids", "scores"))
@torch.no_grad()
def reinforce_pp_baseline(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ w/ Baseline (Hu et al., "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global
    Normalization", arXiv 2501.03262v9, Nov 2025; OpenRLHF's `reinforce_baseline`): the group mean of the outcome
    *score* is the baseline, subtracted before the KL penalties join the return, then the global normalisation of
    `reinforce_pp`:

        s_j     = outcome score of response j (no KL)             (`scores`)
        G_{i,t} = sum_{u >= t} gamma^(u - t) r_{i,u}               (token rewards: score on the last token, -beta KL_u
                                                                    on every token with kl_placement "reward")
        a_{i,t} = G_{i,t} - mean_{j in g(i)} s_j                   (group of size 1: mean 0)
        A_{i,t} = (a_{i,t} - mu) / sqrt(var + eps)                 (mu, var over the trained tokens, `loss_mask`)

    This equals OpenRLHF's order: the score minus its group mean, then the KL reward, then the return-to-go (the
    baseline passes through the sum unchanged). Subtracting the group mean of the total reward, KL included, would
    be another baseline (verl uses the sequence's summed token rewards); without a KL in the reward they agree.

    Args:
        token_rewards: (B, T); response_mask: (B, T); group_ids: (B,) long, required; scores: (B,), required;
        loss_mask: (B, T) or None; gamma: discount.
    Returns:
        advantages (B, T) = returns (B, T), zero outside the mask.
    """
    group_ids = _require("reinforce_pp_baseline", "group_ids", group_ids)
    s = _require("reinforce_pp_baseline", "scores", scores).to(token_rewards.dtype)
    return _reinforce_pp(token_rewards, response_mask, _group_stats(s, group_ids)[2], loss_mask, gamma, eps)


@ADVANTAGES.register("remax", requires=("baseline_rewards",))
@torch.no_grad()
def remax(
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    scores: Tensor | None = None,
    loss_mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """ReMax (Li et al. 2024, "ReMax: A Simple, Effective, and Efficient RL Method for Aligning LLMs"):

        A_i = r_i - r(greedy response to the same prompt)

    Args:
        token_rewards: (B, T); response_mask: (B, T); baseline_rewards: (B,), required.
    Returns:
        advantages (B, T) = returns (B, T), zero outside the mask.
    """
    baseline_rewards = _require("remax", "baseline_rewards", baseline_rewards)
    m = as_bool(response_mask)
    r = _seq_score(token_rewards, m)
    return _broadcast(r - baseline_rewards.to(r.dtype), m)
