"""Batches passed between phases. Every field carries its shape and meaning.

B = sequences in the batch, P = longest prompt (left-padded), T = longest response (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # (B, P) long: prompt tokens, left-padded with pad_token_id
    prompt_mask: Tensor  # (B, P) long: 1 on real prompt tokens
    response_ids: Tensor  # (B, T) long: sampled tokens a_t, EOS included, right-padded
    response_mask: Tensor  # (B, T) float: 1 on a_t up to and including EOS, 0 after
    logprobs: Tensor  # (B, T) float: log pi_old(a_t | s_t) at the sampling temperature, 0 off the mask
    finished: Tensor  # (B,) bool: the response ended with EOS (False: truncated at max_new_tokens)

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def select(self, idx: Tensor | slice) -> "RolloutBatch":
        """The sub-batch of rows `idx` (a micro-batch)."""
        return RolloutBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def response_lengths(self) -> Tensor:  # (B,) long
        return self.response_mask.sum(-1).long()


def pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    """(B, L) -> (B, width), padding with `value` on the left or the right."""
    extra = width - x.size(1)
    if extra <= 0:
        return x
    pad = torch.full((x.size(0), extra), value, dtype=x.dtype)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def cat_padded(items: list, pad_token_id: int):
    """Stack dataclass batches (RolloutBatch, Experience) of different widths: `prompt_*` fields re-padded on
    the left, 2-D response fields on the right (ids with pad_token_id, the rest with 0); None stays None."""
    if len(items) == 1:
        return items[0]
    P = max(e.prompt_ids.size(1) for e in items)
    T = max(e.response_ids.size(1) for e in items)
    out = {}
    for f in fields(items[0]):
        parts = [getattr(e, f.name) for e in items]
        if any(x is None for x in parts):
            out[f.name] = None
            continue
        left = f.name.startswith("prompt")
        value = pad_token_id if f.name.endswith("_ids") else 0
        out[f.name] = torch.cat([pad_to(x, P if left else T, value, left) if x.dim() == 2 else x for x in parts])
    return type(items[0])(**out)


def cat_rollouts(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """Rollout batches of different prompt/response widths stacked into one."""
    return cat_padded(batches, pad_token_id)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids (B, L), mask (B, L)) padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids (B, L), mask (B, L) float) padded on the right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width))
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1.0
    return ids, mask
