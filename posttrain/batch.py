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
    rollout_logprobs: Tensor  # (B, T) float: log pi_rollout(a_t | s_t) as the rollout engine returned it, at the
    #                           sampling temperature, 0 off the mask
    finished: Tensor  # (B,) bool: the response ended with EOS (False: truncated at max_new_tokens)
    # (B, T) float: 1 on the tokens the policy chose (what a loss trains on and an estimator assigns credit to);
    # None: every response token (a single-turn rollout). In a multi-turn rollout the tool output inside the
    # response is under response_mask (the model reads it) but not under loss_mask, so it has holes.
    loss_mask: Tensor | None = None
    # (B, T) float: log pi_old(a_t | s_t) by the trainer's forward pass (an external engine: the learner's forward
    # phase); None: the rollout's own, the very same tensor (posttrain's engine in fp32 is the trainer's forward)
    old_logprobs: Tensor | None = None
    # (B) what each trajectory of an environment rollout did (posttrain/rollout/multiturn.py): its segments,
    # final answer, environment reward, tool calls, why it stopped, its decoder's counts; None from a bare
    # `generate` call
    trajectories: Trajectories | None = None
    # (B) the speculative decoder's counts of each row of a bare generate call (posttrain/rollout/speculative.py
    # DecodeCounts); None: plain decoding, or the rollout driver's batch (its trajectories hold them, per turn summed)
    decode_counts: DecodeCounts | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.response_mask
        if self.old_logprobs is None:
            self.old_logprobs = self.rollout_logprobs

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def select(self, idx: Tensor | slice) -> "RolloutBatch":
        """The sub-batch of rows `idx` (a micro-batch)."""
        return RolloutBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                               for f in fields(self)})

    @property
    def response_lengths(self) -> Tensor:  # (B,) long
        return self.response_mask.sum(-1).long()


class Records(tuple):
    """One plain-data record (a dict) per row of a RolloutBatch, indexed like its tensors: by an int (the record),
    a slice, a list or a (long or bool) tensor of rows (a record sequence of the same class). `to(device)` is
    itself, so a batch that carries one moves like one made of tensors only; `cat_padded` joins them in order and
    a checkpoint stores them by class name (posttrain/rl/ahead.py)."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)(super().__getitem__(idx))
        if isinstance(idx, Tensor) and idx.dim() > 0:
            idx = (idx.nonzero().squeeze(1) if idx.dtype == torch.bool else idx).tolist()
        elif hasattr(idx, "__index__"):  # one row (an int, a 0-dim tensor): its record
            return super().__getitem__(idx.__index__())
        return type(self)(super(Records, self).__getitem__(int(i)) for i in idx)

    def to(self, *args, **kwargs) -> Records:
        return self

    def dim(self) -> int:
        return 1


class Trajectories(Records):
    """What each trajectory of an environment rollout did, one record per row. The record's keys:
    posttrain/rollout/multiturn.py."""


class DecodeCounts(Records):
    """The speculative decoder's counts, one record per row of a generate call: {"rows": 1, "row_passes": verify
    passes the row was live in, "drafted": draft tokens verified for it, "accepted": those accepted, "tokens":
    tokens it emitted (the first from the prefill)}. Sums over rows are `speculative_generate`'s `stats`
    (posttrain/rollout/speculative.py; its `passes` aside)."""


def last_token_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) long: the column of each row's last token under the mask (0 for an empty row). Holes
    in the mask (tool output inside a multi-turn response) are allowed: it is the last 1, not the count."""
    T = mask.size(-1)
    positions = torch.arange(1, T + 1, device=mask.device).expand(mask.shape)
    return ((positions * (mask != 0)).max(-1).values - 1).clamp(min=0)


def micro_rows(response_mask: Tensor, size: int | None) -> list[Tensor]:
    """Row indices of micro-batches of `size` rows (None or >= B: one micro-batch of every row, in order).

    With more than one micro-batch the rows are taken in order of response length (a stable sort, so the
    grouping is deterministic), so that rows of similar length share a micro-batch and `trim_columns` cuts most
    of their padding. A sum over micro-batches (gradient accumulation, token-weighted metrics) does not depend
    on how rows are grouped, up to float rounding."""
    B = response_mask.size(0)
    if size is None or size >= B:
        return [torch.arange(B)]
    return list(torch.sort(response_mask.sum(-1), stable=True).indices.split(size))


def trim_columns(prompt_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """(first, end): the prompt columns before `first` are left padding in every row, the response columns from
    `end` on are past every row's end. Dropping them changes no real token's value (padding is masked out of
    attention and causal attention never looks right), only the compute. At least one column of each is kept."""
    used = prompt_mask.bool().any(0).nonzero()
    first = min(int(used[0]), prompt_mask.size(1) - 1) if len(used) else prompt_mask.size(1) - 1
    live = response_mask.bool().any(0).nonzero()
    end = max(int(live[-1]) + 1, 1) if len(live) else 1
    return first, end


def trimmed(batch):
    """A dataclass batch (RolloutBatch, Experience) without its all-padding columns (`trim_columns`): prompt_*
    fields lose columns on the left, the 2-D response fields on the right; 1-D fields and None are kept."""
    first, end = trim_columns(batch.prompt_mask, batch.response_mask)
    if first == 0 and end == batch.response_mask.size(1):
        return batch
    out = {}
    for f in fields(batch):
        x = getattr(batch, f.name)
        if x is not None and x.dim() == 2:
            x = x[:, first:] if f.name.startswith("prompt") else x[:, :end]
        out[f.name] = x
    return type(batch)(**out)


def map_micro_batches(batch, size: int | None, fn) -> Tensor:
    """fn(micro) -> (b, T') per-token values for each micro-batch of `batch` (`micro_rows`, `trimmed`), put back
    as one (B, T) tensor, 0 in the columns a micro-batch did not have. For the passes without a gradient
    (reference log-probs, values): their padding cut like the update's."""
    out = torch.zeros(batch.response_mask.shape, device=batch.response_mask.device)
    for rows in micro_rows(batch.response_mask, size):
        part = fn(trimmed(batch.select(rows)))
        out[rows, :part.size(1)] = part.to(out.dtype)
    return out


def pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    """(B, L) -> (B, width), padding with `value` on the left or the right."""
    extra = width - x.size(1)
    if extra <= 0:
        return x
    pad = torch.full((x.size(0), extra), value, dtype=x.dtype, device=x.device)
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
        if isinstance(parts[0], Records):
            out[f.name] = type(parts[0])(r for x in parts for r in x)
            continue
        out[f.name] = torch.cat([pad_to(x, P if left else T, value, left) if x.dim() == 2 else x for x in parts])
    return type(items[0])(**out)



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
