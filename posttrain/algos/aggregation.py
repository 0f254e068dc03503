"""The only loss reduction: (B, T) per-token loss -> scalar, for every algorithm.

    loss = aggregate(per_token_loss, response_mask, mode, global_num_tokens=..., global_num_seqs=...)

Every mode is a sum over this batch divided by a count (or a constant). Pass the counts of the whole
global batch (all micro-batches, all ranks) and the sum of `aggregate` over micro-batches equals
`aggregate` over the full batch, so gradient accumulation is exact:

    global_num_tokens = response_mask.sum()                      over the global batch
    global_num_seqs   = (response_mask.sum(-1) > 0).sum()        over the global batch

When a count is None it is this batch's. Counts below 1 are taken as 1, so an empty batch gives 0.
A sequence with no valid token contributes 0 and is not counted as a sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import as_bool, zero_outside

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _count(given: float | Tensor | None, local: Tensor) -> Tensor:
    c = local if given is None else torch.as_tensor(given, dtype=local.dtype, device=local.device)
    return c.clamp(min=1)


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """Reduce a per-token loss l_{i,t} with mask m_{i,t} (n_i = sum_t m_{i,t}) to a scalar.

        token-mean               sum_{i,t} m l / N_tokens                      (DAPO; verl default)
        seq-mean-token-mean      sum_i [sum_t m l / n_i] / N_seqs              (GRPO, GSPO paper)
        seq-mean-token-sum       sum_i [sum_t m l] / N_seqs
        seq-mean-token-sum-norm  sum_i [sum_t m l / norm_constant] / N_seqs    (Dr. GRPO: constant = max
                                                                                response length)

    Args:
        loss: (B, T) per-token loss.
        mask: (B, T) {0, 1} float or bool.
        mode: one of AGG_MODES.
        global_num_tokens: N_tokens of the global batch (default: this batch's valid tokens).
        global_num_seqs: N_seqs of the global batch (default: this batch's sequences with n_i > 0).
        norm_constant: required for "seq-mean-token-sum-norm".
    Returns:
        scalar tensor.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    m = as_bool(mask)
    masked = zero_outside(loss, m)
    if mode == "token-mean":
        return masked.sum() / _count(global_num_tokens, m.sum().to(loss.dtype))

    n_tok = m.sum(-1).to(loss.dtype)  # (B,)
    seq = masked.sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        seq = seq / n_tok.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if norm_constant is None:
            raise ValueError("aggregation mode 'seq-mean-token-sum-norm' requires norm_constant")
        seq = seq / norm_constant
    return seq.sum() / _count(global_num_seqs, (n_tok > 0).sum().to(loss.dtype))
