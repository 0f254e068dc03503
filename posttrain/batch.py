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
