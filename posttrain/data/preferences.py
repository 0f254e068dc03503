"""Preference pairs (prompt, chosen, rejected) from JSONL, Parquet or a Hugging Face dataset directory.

Sources (`load_preference_pairs(source)`), all local:
    *.jsonl, *.jsonl.gz   one JSON object per line, read here line by line (blank lines are skipped)
    *.parquet             through `datasets.Dataset.from_parquet`
    a directory           saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
                          (`datasets.load_from_disk`), else any local data directory that
                          `datasets.load_dataset(dir)` reads (e.g. train.jsonl + test.jsonl files).
                          A DatasetDict needs `split`, or has a "train" split, or only one split.
Row formats (`format="auto"` picks one from the keys of the first row):
    prompt_chosen_rejected  {"prompt": str, "chosen": str, "rejected": str}, completions without the prompt
    hh                      {"chosen": str, "rejected": str}: two whole HH-RLHF dialogues
                            "\\n\\nHuman: ...\\n\\nAssistant: ..." that share a prefix; see `split_hh`.
Other keys in a row are ignored.

A pair whose chosen and rejected completions are identical carries no preference signal: it is skipped,
and the number skipped is logged once as a warning on the `posttrain.data.preferences` logger. Every
other problem (missing file, unreadable or non-object line, missing or non-string field, no rows)
raises `DataError` with a one-line message naming the source and the 1-based line (JSONL) or row
(datasets), e.g. `data/pairs.jsonl line 17: missing field 'rejected'`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from posttrain.data.jsonl import iter_jsonl
from posttrain.data.jsonl import one_line as _one_line
from posttrain.errors import DataError

log = logging.getLogger(__name__)

Format = Literal["auto", "prompt_chosen_rejected", "hh"]
FORMATS: tuple[str, ...] = ("auto", "prompt_chosen_rejected", "hh")
ASSISTANT = "\n\nAssistant:"
_FIELDS = {"prompt_chosen_rejected": ("prompt", "chosen", "rejected"), "hh": ("chosen", "rejected")}

T = TypeVar("T")


@dataclass(frozen=True)
class PreferencePair:
    """One human (or AI) preference: for `prompt`, completion `chosen` is preferred over `rejected`.

    `chosen` and `rejected` are the completions only; `prompt + chosen` is the full chosen text. For HH-RLHF
    rows the prompt ends with "Assistant:" and each completion keeps its leading space.
    """

    prompt: str
    chosen: str
    rejected: str


def load_preference_pairs(
    source: str | Path,
    *,
    split: str | None = None,
    format: Format = "auto",
    limit: int | None = None,
) -> list[PreferencePair]:
    """Read preference pairs from a local file or dataset directory (see the module docstring).

    Args:
        source: a .jsonl / .jsonl.gz / .parquet file or a dataset directory.
        split: the split of a DatasetDict; None picks "train" or the only split. A source without
            splits (a file, a saved single Dataset) rejects a split.
        format: "prompt_chosen_rejected", "hh", or "auto" (from the first row's keys).
        limit: stop after this many pairs (identical pairs skipped do not count); None reads all.
    Returns:
        the pairs, in file order.
    Raises:
        DataError: naming the source and the line / row / field at fault.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None; got {limit}")
    label = str(source)
    pairs, skipped = _parse_rows(_rows(Path(source), label, split), format, limit, label)
    if skipped:
        log.warning("%s: skipped %d pair(s) whose chosen and rejected completions are identical "
                    "(kept %d)", label, skipped, len(pairs))
    return pairs


def split_hh(chosen: str, rejected: str) -> PreferencePair:
    """Split two HH-RLHF dialogues into (prompt, chosen, rejected).

    The prompt is the dialogue up to and including the last "\\n\\nAssistant:" inside the longest
    common prefix of the two; the completions are what follows it in each. Usually the dialogues
    differ only in the final Assistant turn; when they differ earlier, the completions span several
    turns. Raises ValueError when the two share no Assistant marker.
    """
    at = len(chosen)
    while (at := chosen.rfind(ASSISTANT, 0, at)) >= 0:  # markers of chosen, last first
        end = at + len(ASSISTANT)
        if rejected.startswith(chosen[:end]):  # usually true for the last marker
            return PreferencePair(prompt=chosen[:end], chosen=chosen[end:], rejected=rejected[end:])
    raise ValueError(f"'chosen' and 'rejected' share no {ASSISTANT!r} turn, so there is no common prompt")


def split_pairs(pairs: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A random (train, eval) partition of `pairs`, the same for the same seed and input.

    The eval part has round(len * eval_fraction) pairs, at least 1 when eval_fraction > 0 and at most
    len - 1; both parts keep the input order. Pairs are split one by one, not grouped by prompt, so a
    prompt with several pairs can appear on both sides.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    n = len(pairs)
    if eval_fraction == 0.0:
        return list(pairs), []
    if n < 2:
        raise DataError(f"need at least 2 pairs to split off an eval set (or give eval_data); got {n}")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    eval_idx = set(random.Random(seed).sample(range(n), n_eval))
    train = [p for i, p in enumerate(pairs) if i not in eval_idx]
    return train, [p for i, p in enumerate(pairs) if i in eval_idx]


# ---------------------------------------------------------------------------------------- rows -> pairs

def _parse_rows(rows: Iterable[tuple[str, Any]], format: Format, limit: int | None,
                label: str) -> tuple[list[PreferencePair], int]:
    """(where, row) items -> (pairs, number of identical pairs skipped)."""
    pairs: list[PreferencePair] = []
    n_rows = skipped = 0
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with fields 'chosen' and 'rejected', "
                            f"got {_type_name(row)}")
        if format == "auto":
            format = _detect_format(row, where)
        pair = _to_pair(row, format, where)
        n_rows += 1
        if pair.chosen == pair.rejected:
            skipped += 1
            continue
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if n_rows == 0:
        raise DataError(f"{label}: no rows")
    if not pairs:
        raise DataError(f"{label}: no usable pairs: all {n_rows} rows have identical chosen and rejected")
    return pairs, skipped


def _detect_format(row: dict, where: str) -> str:
    if "prompt" in row:
        return "prompt_chosen_rejected"
    if "chosen" in row and "rejected" in row:
        return "hh"
    keys = ", ".join(repr(k) for k in row) or "none"
    raise DataError(f"{where}: cannot tell the format: expected fields 'prompt', 'chosen', 'rejected' "
                    f"or HH-RLHF 'chosen', 'rejected'; got {keys}")


def _to_pair(row: dict, format: str, where: str) -> PreferencePair:
    values = []
    for name in _FIELDS[format]:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {_type_name(row[name])}")
        values.append(row[name])
    if format == "prompt_chosen_rejected":
        if not values[0].strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return PreferencePair(*values)
    try:
        return split_hh(*values)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------- source -> rows

def _rows(path: Path, label: str, split: str | None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the source; `where` is e.g. "pairs.jsonl line 3"."""
    if not path.exists():
        raise DataError(f"{label}: no such file or directory")
    name = path.name.lower()
    if path.is_file() and (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        if split is not None:
            raise DataError(f"{label}: split={split!r} given, but a single file has no splits")
        return iter_jsonl(path, label)
    if path.is_dir() or name.endswith(".parquet"):
        return _dataset_rows(path, label, split)
    raise DataError(f"{label}: unsupported file type; expected .jsonl, .jsonl.gz, .parquet or a dataset "
                    f"directory")


def _dataset_rows(path: Path, label: str, split: str | None) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file or dataset directory, read with Hugging Face `datasets`."""
    import datasets  # ~1 s to import: only when needed

    try:
        if path.is_file():
            data = datasets.Dataset.from_parquet(str(path))
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types (ArrowInvalid, FileNotFoundError, ValueError...)
        raise DataError(f"{label}: cannot load with datasets: {_one_line(err)}") from None
    if isinstance(data, datasets.DatasetDict):
        split = _pick_split(list(data), split, label)
        data, label = data[split], f"{label} (split {split!r})"
    elif split is not None:
        raise DataError(f"{label}: split={split!r} given, but this dataset has no splits")
    return _iter_dataset(data, label)


def _iter_dataset(data: Any, label: str) -> Iterator[tuple[str, Any]]:
    n = 0
    for batch in data.iter(batch_size=1024):  # dict of columns -> rows
        keys = list(batch)
        for values in zip(*batch.values()):
            n += 1
            yield f"{label} row {n}", dict(zip(keys, values))


def _pick_split(splits: list[str], split: str | None, label: str) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(f"{label}: no split {split!r}; splits: {', '.join(splits)}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{label}: several splits ({', '.join(splits)}) and none is 'train'; pass split=")
