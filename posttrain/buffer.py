"""The experience buffer: rollouts with everything the update needs, computed once, then used for a few
epochs of shuffled minibatches and flushed.

    buffer.add(experience)                                   # after generate/score/reference/values/advantages
    for epoch in range(ppo_epochs):
        for mb in buffer.minibatches(mini_batches, generator):   # a fresh permutation every epoch
            for micro in mb.split(micro_batch_size): ...          # gradient accumulation
    buffer.clear()                                           # on-policy: the data is used up

B = sequences, P = longest prompt (left-padded), T = longest response (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from posttrain.batch import cat_padded, micro_rows, trimmed


@dataclass
class Experience:
    prompt_ids: Tensor  # (B, P) long: prompt tokens, left-padded
    prompt_mask: Tensor  # (B, P) long: 1 on real prompt tokens
    response_ids: Tensor  # (B, T) long: a_t, EOS included, right-padded
    response_mask: Tensor  # (B, T) float: 1 on response tokens (what the forward pass reads)
    loss_mask: Tensor  # (B, T) float: 1 on the tokens the losses train on (holes allowed; 0 on truncated rows
    #                    under rl.mask_truncated); every loss, aggregation and count uses this mask
    old_logprobs: Tensor  # (B, T) log pi_old(a_t | s_t) by the trainer's forward pass (the ratio's denominator)
    advantages: Tensor  # (B, T) A_t (whitened if configured)
    returns: Tensor  # (B, T) R_t = A_t + V_old(s_t) (critic targets; equal to advantages without a critic)
    ref_logprobs: Tensor | None = None  # (B, T) log pi_ref(a_t | s_t); None without a reference model
    values: Tensor | None = None  # (B, T) V_old(s_t) from the critic at rollout time; None without a critic
    # (B, T) log pi_rollout(a_t | s_t) as the rollout engine returned it (the samples' true behaviour policy; the
    # rollout correction weighs the loss by pi_old / pi_rollout); None: the same tensor as old_logprobs
    rollout_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.rollout_logprobs is None:
            self.rollout_logprobs = self.old_logprobs

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def select(self, idx: Tensor | slice) -> "Experience":
        """The rows `idx`, every field alike."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                             for f in fields(self)})

    def split(self, size: int | None) -> list["Experience"]:
        """Micro-batches of `size` rows (None: the whole batch as one), rows of similar response length together
        and each without its all-padding columns (`posttrain.batch.micro_rows`, `trimmed`; `map_micro_batches`
        puts per-row results of the same grouping back)."""
        return [micro for _, micro in self.split_indexed(size)]

    def split_indexed(self, size: int | None) -> list[tuple[Tensor, "Experience"]]:
        """`split`'s micro-batches, each with its rows' indices into this batch."""
        groups = micro_rows(self.response_mask, size)
        return [(rows, trimmed(self) if len(groups) == 1 else trimmed(self.select(rows))) for rows in groups]

    @property
    def num_tokens(self) -> Tensor:  # scalar: tokens under the loss mask
        return self.loss_mask.sum()

    @property
    def num_seqs(self) -> Tensor:  # scalar: sequences with at least one token under the loss mask
        return (self.loss_mask.sum(-1) > 0).sum().to(self.loss_mask.dtype)


class ExperienceBuffer:
    """Holds the experiences of one rollout step until the update has used them."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self._items: list[Experience] = []

    def add(self, experience: Experience) -> None:
        self._items.append(experience)

    def __len__(self) -> int:
        return sum(len(e) for e in self._items)

    def minibatches(self, num_minibatches: int, generator: torch.Generator | None = None) -> list[Experience]:
        """All stored rows, shuffled (when there is more than one minibatch), in `num_minibatches` equal parts."""
        data = cat_padded(self._items, self.pad_token_id)
        n = len(data)
        if n % num_minibatches:
            raise ValueError(f"{n} experiences cannot be split into {num_minibatches} equal minibatches")
        order = torch.randperm(n, generator=generator) if num_minibatches > 1 else torch.arange(n)
        size = n // num_minibatches
        return [data.select(order[k * size:(k + 1) * size]) for k in range(num_minibatches)]

    def replace(self, items: list[Experience]) -> None:
        """Hold `items` instead (the same rows, e.g. with recomputed old log-probs)."""
        self._items = list(items)

    def clear(self) -> None:
        self._items = []
