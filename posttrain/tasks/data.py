"""Reading task rows: JSON Lines from a path, or a Hugging Face dataset; malformed rows are one-line DataErrors.

Every row comes back with `where`, the place to name in an error: `path:line` for a file, `name[split] row i`
for a dataset.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import DataError


@dataclass(frozen=True)
class Row:
    where: str  # "data/train.jsonl:12" or "openai/gsm8k[train] row 11"
    fields: dict


def read_jsonl(path: str | Path) -> list[Row]:
    """Every non-blank line of a JSON Lines file, as a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(f"{path}:{n}", obj))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_hf(name: str, split: str = "train", config: str | None = None) -> list[Row]:
    """Rows of a Hugging Face dataset (a hub name, or a local directory of data files) through `datasets`."""
    import datasets  # heavy; only when asked for

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise DataError(f"dataset {name!r} (config {config!r}, split {split!r}): cannot load: "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    label = f"{name}[{split}]"
    return [Row(f"{label} row {i}", dict(r)) for i, r in enumerate(ds)]


def load_rows(path: str | Path | None = None, hf_dataset: str | None = None, hf_split: str = "train",
              hf_config: str | None = None) -> list[Row]:
    """Rows from exactly one source: a JSONL `path`, or a Hugging Face `hf_dataset`."""
    if (path is None) == (hf_dataset is None):
        raise DataError("give exactly one data source: a JSONL path or a Hugging Face dataset name")
    return read_jsonl(path) if path is not None else read_hf(hf_dataset, hf_split, hf_config)


def field(row: Row, name: str, kind: type | tuple[type, ...] = str, nonempty: bool = True):
    """`row.fields[name]`, checked: present, of type `kind`, and (for str and list) not empty."""
    if name not in row.fields:
        raise DataError(f"{row.where}: missing field {name!r}")
    value = row.fields[name]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(f"{row.where}: field {name!r} should be {names}, got {type(value).__name__}")
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise DataError(f"{row.where}: field {name!r} is empty")
    return value


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def split_eval(items: Sequence, num_eval: int, seed: int, name: str) -> tuple[list, list]:
    """(train, eval): a seeded shuffle puts `num_eval` items in a held-out split, disjoint from the rest."""
    if not 0 <= num_eval < len(items):
        raise DataError(f"task {name}: num_eval={num_eval} must be less than the {len(items)} problems loaded, "
                        f"leaving some for training")
    order = list(items)
    random.Random(f"{name}-split-{seed}").shuffle(order)
    return order[num_eval:], order[:num_eval]
