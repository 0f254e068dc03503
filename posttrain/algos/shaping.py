"""DAPO's reward shaping and batch filtering, as pure tensor functions (Yu et al. 2025, "DAPO: An Open-Source
LLM Reinforcement Learning System at Scale", sec. 3.2-3.4).

    overlong_penalty(lengths, max_length, buffer_length, factor)   soft punishment of long responses
    informative_groups(scores, group_size)                          dynamic sampling's group filter
    truncation_loss_mask(response_mask, finished)                   overlong filtering: drop truncated samples
"""

from __future__ import annotations

from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, buffer_length: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the outcome reward:

        L_exp = max_length - buffer_length
        R_len(y) = 0                                        if |y| <= L_exp
                 = factor * (L_exp - |y|) / buffer_length   if L_exp < |y| <= max_length
                 = -factor                                  if |y| > max_length

    |y| counts response tokens, EOS included (a response cut at max_length has |y| = max_length and gets
    -factor). `factor` = 1 is the paper's; verl calls it overlong_penalty_factor.

    Args:
        lengths: (B,) response lengths in tokens (any numeric dtype).
        max_length: L_max, the longest response generation allows.
        buffer_length: L_cache >= 1, the length of the soft band.
        factor: size of the largest penalty.
    Returns:
        (B,) float penalties in [-factor, 0].
    """
    if buffer_length < 1 or buffer_length > max_length:
        raise ValueError(f"buffer_length must be in [1, max_length={max_length}], got {buffer_length}")
    exceed = lengths.float() - (max_length - buffer_length)
    return -factor * (exceed / buffer_length).clamp(min=0.0, max=1.0)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling filter (eq. 11, the constraint 0 < |{o_i correct}| < G): keep a group only if
    its scores are not all equal. A group whose G scores are equal has zero group-relative advantage for
    every sample, so it contributes no policy gradient (only KL/entropy terms) while diluting the batch.

    Args:
        scores: (N * G,) the outcome scores, groups contiguous (rows i*G .. i*G+G-1 share prompt i).
        group_size: G.
    Returns:
        (N,) bool: True for groups with max > min.
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.view(-1, group_size)
    return grouped.max(-1).values > grouped.min(-1).values


def truncation_loss_mask(response_mask: Tensor, finished: Tensor) -> Tensor:
    """DAPO's overlong filtering (sec. 3.4): a response cut off at max_length without EOS is excluded from the
    loss, so the policy is not punished for reasoning that might have been right had it been allowed to finish.

        mask'_{i,t} = mask_{i,t} * finished_i

    Args:
        response_mask: (B, T) {0, 1}. finished: (B,) bool, the response ended with EOS.
    Returns:
        (B, T) mask of the same dtype.
    """
    return response_mask * finished.to(response_mask.dtype)[:, None]
