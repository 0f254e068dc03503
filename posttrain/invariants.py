"""Invariants the RL loop checks every step (cheap; on by default with rl.check_invariants; loud on failure).

    check_ratio_is_one(logprobs, old_logprobs, mask, tolerance)   first minibatch of a rollout batch
    check_mask_not_empty(response_mask)                           after truncation masking
    check_finite(x, mask, name)                                   advantages (and returns)

Each raises `InvariantError` with one line that says what was measured and what usually causes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.errors import InvariantError


def check_ratio_is_one(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, tolerance: float) -> float:
    """Before the first optimizer step on a rollout batch the policy is the one that generated it, so
    pi_theta(a_t|s_t) / pi_old(a_t|s_t) = 1 for every response token. A larger |log ratio| means the
    training forward pass disagrees with generation: dropout left on, a different temperature, a
    different model or dtype, or misaligned positions. Returns max |log ratio| (0 for an empty mask).

    logprobs, old_logprobs, mask: (B, T).
    """
    with torch.no_grad():
        m = mask != 0
        if not m.any():
            return 0.0
        worst = float((logprobs.detach() - old_logprobs).abs()[m].max())
    if not worst <= tolerance:  # also catches NaN
        raise InvariantError(
            f"the first minibatch's probability ratio should be 1, but max |log pi - log pi_old| = {worst:.3g} "
            f"> rl.ratio_tolerance={tolerance:g}: training log-probs disagree with generation (dropout on, "
            "another temperature, model or dtype?)")
    return worst


def check_mask_not_empty(response_mask: Tensor) -> None:
    """The batch must hold at least one response token to train on. (B, T)."""
    if not bool((response_mask != 0).any()):
        raise InvariantError("the response mask is empty: no response token to train on (with "
                             "rl.mask_truncated, every response hit rl.max_new_tokens; raise it)")


def check_finite(x: Tensor, mask: Tensor, name: str) -> None:
    """Every entry of `x` (B, T) under `mask` must be finite."""
    bad = ~torch.isfinite(x) & (mask != 0)
    if bool(bad.any()):
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise InvariantError(f"{int(bad.sum())} non-finite {name} in sequences {rows[:8]}: a reward or value "
                             "is NaN or infinite")
