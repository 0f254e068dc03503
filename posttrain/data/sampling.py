"""Endless shuffled minibatches, reshuffled on every pass, from a caller-owned RNG (so runs are seeded).

The position in the data is state (`state_dict` / `load_state_dict`), so a resumed run continues with the
same batches an uninterrupted one would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class ShuffledBatches(Generic[T]):
    """Iterator of lists of `batch_size` items forever; every pass over `items` is a fresh shuffle."""

    def __init__(self, items: Sequence[T], rng: random.Random, batch_size: int):
        self.items, self.rng, self.batch_size = items, rng, batch_size
        self.order: list[int] = []  # indices drawn but not yet served

    def __iter__(self) -> "ShuffledBatches[T]":
        return self

    def __next__(self) -> list[T]:
        while len(self.order) < self.batch_size:
            fresh = list(range(len(self.items)))
            self.rng.shuffle(fresh)
            self.order += fresh
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return [self.items[i] for i in idx]

    def state_dict(self) -> dict:
        """The remaining order and the RNG's state (the RNG is the caller's, but its state is saved here)."""
        return {"order": list(self.order), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.rng.setstate(as_random_state(state["rng"]))


def as_random_state(state) -> tuple:
    """random.Random.setstate wants tuples; a checkpoint may give lists back."""
    version, internal, gauss = state
    return version, tuple(internal), gauss

