"""Rollout/trainer mismatch: how far the rollout engine's log-probs are from the trainer's, and the registered
importance-weight corrections of the policy loss.

The rollout engine samples a_t from pi_rollout and returns log pi_rollout(a_t) (`rollout_logprobs`); the trainer's
forward pass over the same tokens gives log pi_old(a_t) (`old_logprobs`). They differ (vLLM's kernels vs the
training forward, bf16 vs fp32), so the batch is slightly off-policy for pi_old, by the ratio

    token level:     rho_t = pi_old(a_t) / pi_rollout(a_t) = exp(old_logprobs_t - rollout_logprobs_t)
    sequence level:  rho_i = prod_t rho_t = exp(sum_t (old_logprobs_t - rollout_logprobs_t)), on each of its tokens

(`LEVELS`; the summed log-ratio is clamped to [-20, 20] before exp). A correction maps rho to a weight w (no
gradient), and the learner multiplies the per-token policy loss by it before the aggregation, l_t <- w_t l_t:

    tis     w = min(rho, C)                   truncated IS: Yao et al. 2025, "Your Efficient RL Framework Secretly
                                              Brings You Off-Policy RL Training" (TIS, C = 2)
    mis     w = rho * 1[rho <= C]             masked IS: Liu et al. 2025, "When Speed Kills Stability:
                                              Demystifying RL Collapse from the Training-Inference Mismatch" (MIS)
    icepop  w = rho * 1[1/C <= rho <= C]      IcePop (Ling Team 2025, the Ring-1T report and the blog "Small Leak
                                              Can Sink a Great Ship"): both tails masked; its band [alpha, beta]
                                              ([0.5, 5] there) is here the symmetric [1/C, C]

Registry signature: fn(log_ratio (B, T), mask (B, T), *, cap: float) -> weights (B, T), no grad, 0 off the mask,
where log_ratio = log rho at the chosen level. Where the two log-probs are the same numbers, log rho = 0, rho = 1
exactly, and every weight is exactly 1: the correction changes no bit of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import kl_k3
from .registry import Registry
from .utils import as_bool, masked_mean, zero_outside

ROLLOUT_CORRECTIONS = Registry("rollout correction")

_MAX_LOG_RATIO = 20.0


def token_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = old_logprobs_t - rollout_logprobs_t.  (B, T) x3 -> (B, T), 0 off the mask."""
    m = as_bool(mask)
    return zero_outside(old_logprobs, m) - zero_outside(rollout_logprobs, m)


def sequence_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho_i = sum_t (old - rollout) over the row's tokens, on each of them, clamped to [-20, 20].
    (B, T) x3 -> (B, T), 0 off the mask."""
    m = as_bool(mask)
    seq = token_log_ratio(old_logprobs, rollout_logprobs, m).sum(-1, keepdim=True)
    seq = seq.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return zero_outside(seq.expand(m.shape), m)


LEVELS = {"token": token_log_ratio, "sequence": sequence_log_ratio}


def _ratio(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


@ROLLOUT_CORRECTIONS.register("tis")
def truncated_is(log_ratio: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """TIS: w = min(rho, C), rho = exp(log_ratio).  (B, T), (B, T) -> (B, T), 0 off the mask."""
    return zero_outside(torch.clamp(_ratio(log_ratio), max=cap), mask)


@ROLLOUT_CORRECTIONS.register("mis")
def masked_is(log_ratio: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """MIS: w = rho if rho <= C else 0.  (B, T), (B, T) -> (B, T), 0 off the mask."""
    rho = _ratio(log_ratio)
    return zero_outside(torch.where(rho <= cap, rho, torch.zeros_like(rho)), mask)


@ROLLOUT_CORRECTIONS.register("icepop")
def icepop(log_ratio: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """IcePop: w = rho if 1/C <= rho <= C else 0.  (B, T), (B, T) -> (B, T), 0 off the mask."""
    rho = _ratio(log_ratio)
    inside = (rho <= cap) & (rho >= 1.0 / cap)
    return zero_outside(torch.where(inside, rho, torch.zeros_like(rho)), mask)


@torch.no_grad()
def rollout_mismatch(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                     threshold: float) -> dict[str, Tensor]:
    """How far the rollout engine's log-probs are from the trainer's, over the tokens of `mask` (B, T):

        rollout_kl                 token mean of k3 with log r = old - rollout: KL(pi_rollout || pi_old), the
                                   samples being pi_rollout's
        rollout_logprob_diff_max   max_t |old_t - rollout_t|
        rollout_logprob_diff_frac  fraction of tokens with |old_t - rollout_t| > threshold

    (B, T) x3 -> dict of scalars (0 for an empty mask)."""
    m = as_bool(mask)
    diff = token_log_ratio(old_logprobs, rollout_logprobs, m).abs()
    return {"rollout_kl": masked_mean(kl_k3(zero_outside(rollout_logprobs, m), zero_outside(old_logprobs, m)), m),
            "rollout_logprob_diff_max": diff.max() if diff.numel() else diff.new_zeros(()),
            "rollout_logprob_diff_frac": masked_mean((diff > threshold).to(diff.dtype), m)}


@torch.no_grad()
def correction_metrics(weights: Tensor, log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """rollout_is_weight_mean (token mean of w) and rollout_is_changed_frac (tokens where w != rho: truncated or
    masked), over `mask`.  (B, T) x3 -> dict of scalars."""
    m = as_bool(mask)
    changed = (weights != _ratio(log_ratio)).to(weights.dtype)
    return {"rollout_is_weight_mean": masked_mean(weights, m), "rollout_is_changed_frac": masked_mean(changed, m)}
