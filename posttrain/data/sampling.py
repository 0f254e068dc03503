"""Endless shuffled minibatches, reshuffled on every pass, from a caller-owned RNG (so runs are seeded)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def shuffled_batches(items: Sequence[T], rng: random.Random, batch_size: int) -> Iterator[list[T]]:
    """Yield lists of `batch_size` items forever; every pass over `items` is a fresh shuffle."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        yield [items[i] for i in idx]
