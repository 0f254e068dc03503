"""Pretraining-mix (ptx) data: (prompt, completion) texts whose next-token loss is mixed into PPO.

    .txt    one text per non-empty line (prompt "", the whole line is the completion)
    .jsonl  one object per line: {"text": ...} or {"prompt": ..., "completion": ...}

The loss covers the completion tokens (plus EOS); a prompt only conditions.
"""

from __future__ import annotations

import random
from pathlib import Path

from posttrain.data.jsonl import iter_jsonl
from posttrain.data.sampling import ShuffledBatches, as_random_state
from posttrain.errors import DataError


def load_ptx_texts(path: str | Path) -> list[tuple[str, str]]:
    """Read (prompt, completion) pairs; a malformed line raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"rl.ptx_data: file not found: {path}")
    out: list[tuple[str, str]] = []
    if path.suffix == ".txt":
        out = [("", line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        for where, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            if isinstance(row.get("text"), str):
                out.append(("", row["text"]))
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                out.append((row["prompt"], row["completion"]))
            else:
                raise DataError(f"{where}: needs a string 'text', or string 'prompt' and 'completion'")
    else:
        raise DataError(f"rl.ptx_data: {path}: expected a .txt or .jsonl file")
    if not out:
        raise DataError(f"rl.ptx_data: {path} holds no texts")
    return out


class PtxSampler:
    """Endless shuffled ptx minibatches of (prompts, completions), from its own seeded RNG."""

    def __init__(self, data: list[tuple[str, str]], seed: int):
        self.data = data
        self.rng = random.Random(f"ptx-{seed}")
        self._batches: dict[int, ShuffledBatches[tuple[str, str]]] = {}

    def next_batch(self, n: int) -> tuple[list[str], list[str]]:
        batches = self._batches.setdefault(n, ShuffledBatches(self.data, self.rng, n))
        prompts, completions = zip(*next(batches))
        return list(prompts), list(completions)

    def state_dict(self) -> dict:
        """The shared RNG's state and each batch size's remaining order."""
        return {"rng": self.rng.getstate(), "orders": {n: list(b.order) for n, b in self._batches.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(as_random_state(state["rng"]))
        self._batches = {}
        for n, order in state["orders"].items():
            self._batches[int(n)] = ShuffledBatches(self.data, self.rng, int(n))
            self._batches[int(n)].order = list(order)
