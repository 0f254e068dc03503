"""Helpers of the environment tests: models that end their turns often, and a generate call that records what
it sampled."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.rollout.generate import generate

SCRIPTED = f"{Path(__file__).resolve().parent / 'scripted_env.py'}:Scripted"


def likely_to_stop(model, stop_id: int, logit: float = 3.5, vocab_from: int = 4) -> None:
    """Point the output row of `stop_id` along the mean final hidden state, so its logit is about `logit` at every
    position: a random model then ends a turn after a few tokens instead of almost never (in place)."""
    with torch.no_grad():
        vocab = model.get_output_embeddings().weight.size(0)
        ids = torch.randint(vocab_from, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
        h = model.model(input_ids=ids).last_hidden_state
        m = h.reshape(-1, h.size(-1)).mean(0)
        model.get_output_embeddings().weight[stop_id] = logit * m / m.norm() ** 2


class Recorder:
    """`generate` on `model` that keeps every call's inputs and outputs (calls[k] = (ids, mask, RolloutBatch))."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, ids, mask, **kw):
        out = generate(self.model, ids, mask, **kw)
        self.calls.append((ids, mask, out))
        return out
