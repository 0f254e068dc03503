"""Rollout engines: the generator interface a rollout worker holds, and the weight checksum.

    engine.generate(prompt_ids, prompt_mask, max_new_tokens=..., eos_token_id=..., pad_token_id=...,
                    temperature=..., top_k=..., top_p=..., greedy=..., generator=...) -> RolloutBatch
    engine.load_weights(state_dict) -> sha256 of the weights it now holds under those names (state_dict_sha256;
                                       a part: a peft model's adapter)

`TorchEngine` is posttrain's own generation (`posttrain.rollout.generate`, KV cache, on CPU);
`posttrain.rollout.vllm_engine.VLLMEngine` is vLLM on a GPU (the `vllm` extra). Both take prompts as
left-padded ids and return the same `RolloutBatch`, so the loop never asks which one it has.

Sampling seeds: a rollout worker samples its share of step t with `torch.Generator().manual_seed(
shard_seed(seed, t, round, shard))`, so a share does not depend on which worker, or which attempt, generates
it: a restarted worker re-issued a share gives the same tokens, and an in-process run with the same shards
gives the same numbers as the Ray run.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Protocol

import torch
from torch import Tensor

from posttrain.batch import RolloutBatch
from posttrain.rollout import generate
from posttrain.rollout.speculative import speculative_generate


def shard_seed(seed: int, step: int, round_: int, shard: int) -> int:
    """The sampling seed of one share of a rollout batch: step `step`, dynamic-sampling round `round_`, share
    `shard`. A 63-bit integer from SHA-256, so nearby (seed, step, shard) give unrelated streams."""
    digest = hashlib.sha256(f"posttrain-rollout-{seed}-{step}-{round_}-{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order (device-independent)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, generator: torch.Generator | None = None) -> RolloutBatch: ...

    def load_weights(self, state_dict: dict[str, Tensor]) -> str: ...


class TorchEngine:
    """posttrain's generation on a model held in this process. `shared`: the model is also the one being trained
    (the single-process run: the learner's own policy, so there are no weights to send); it is left trainable.
    `speculative`: "none" (generate) or "ngram" (posttrain.rollout.speculative: prompt-lookup speculative
    sampling, the same distribution; `speculative_tokens` drafted tokens k, matched suffix `speculative_ngram`
    n), chosen here once."""

    def __init__(self, model: torch.nn.Module, shared: bool = False, speculative: str = "none",
                 speculative_tokens: int = 4, speculative_ngram: int = 3):
        self.model = model.eval() if shared else model.eval().requires_grad_(False)
        if speculative not in ("none", "ngram"):
            raise ValueError(f"speculative must be 'none' or 'ngram', not {speculative!r}")
        self._generate = generate if speculative == "none" else functools.partial(
            speculative_generate, draft_tokens=speculative_tokens, ngram=speculative_ngram)

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, **kw) -> RolloutBatch:
        return self._generate(self.model, prompt_ids, prompt_mask, **kw)

    def load_weights(self, state_dict: dict[str, Tensor]) -> str:
        """Load every weight, or a part of them (a peft model's adapter: the frozen base is kept); returns the
        sha256 of what the model now holds under the names sent. A name the model lacks is refused."""
        _, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise ValueError(f"load_weights: the model has no tensor {unexpected[0]!r} ({len(unexpected)} unknown)")
        held = self.model.state_dict()
        return state_dict_sha256({name: held[name] for name in state_dict})

