"""Metric sink: one JSON object per line in ``metrics.jsonl``.

A record is a flat (or nested) dict such as
``{"step": 12, "phase": "rl", "loss": 0.31, "reward_mean": 0.5, "kl": 0.002}``.
Values are made JSON-safe before anything is written:

* torch 0-d tensors and numpy scalars become Python numbers (``.item()``);
* NaN and +/-inf become ``null`` (so the file stays strict JSON);
* floats keep full precision (``repr`` round-trips);
* anything else that JSON cannot hold raises ``TypeError`` naming the key,
  and nothing of that record is written.

Each line is flushed as soon as it is written, so a crash loses at most the
line being written; ``read_metrics`` reads the file back.

``sinks`` (train/tracking.py: TensorBoard, W&B) get every record after its line
is written, and the sample tables of ``log_samples``, which metrics.jsonl does
not hold; closing the logger closes them.

This module shadows the standard ``logging`` only inside relative imports;
``import logging`` elsewhere still gets the standard library.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from posttrain.data.jsonl import iter_jsonl
from posttrain.errors import DataError


def _jsonable(value: Any, key: str) -> Any:
    """Return ``value`` as plain JSON types; ``key`` is the dotted path used in errors."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None  # float() unwraps np.float64
    # torch tensors and numpy scalars / arrays: accept 0-d only.
    if hasattr(value, "item") and hasattr(value, "ndim"):
        if value.ndim != 0:
            raise TypeError(
                f"metric {key!r}: expected a scalar, got an array/tensor of shape "
                f"{tuple(value.shape)}; log a scalar or call .tolist() first"
            )
        item = value.item()
        if isinstance(item, (bool, int, float)):
            return _jsonable(item, key)
        raise TypeError(f"metric {key!r}: scalar of type {type(value).__name__} is not a number")
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metric {key!r}: nested key {k!r} is not a str")
            out[k] = _jsonable(v, f"{key}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"metric {key!r}: value of type {type(value).__name__} is not JSON-able")


def _drop_torn_tail(path: Path) -> None:
    """Truncate a final line that has no newline (a write cut short by a crash)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1  # 0 when the whole file is one torn line
        f.truncate(keep)
    warnings.warn(
        f"{path}: dropped an incomplete last line ({len(data) - keep} bytes) before appending",
        stacklevel=3,
    )


class MetricsLogger:
    """Write metric records to a JSON-lines file.

    Args:
        path: the file to write (parent directories are created).
        append: keep existing lines and add after them (for resumed runs). An
            incomplete last line left by a crash is dropped with a warning.
            When False the file is truncated.
        resume_at: cut the file back to this many bytes (a checkpoint's offset) and append.
        sinks: trackers with ``log(record, step)``, ``samples(phase, step, rows)`` and ``close()``.

    Use as a context manager or call ``close()``. ``lines_written`` counts the
    lines this logger wrote, not lines already in an appended file.
    """

    def __init__(self, path: str | Path, append: bool = False, resume_at: int | None = None,
                 sinks: list | tuple = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None:  # a resumed run: drop what was written after its checkpoint
            if not self.path.exists() or self.path.stat().st_size < resume_at:
                raise ValueError(f"{self.path} is shorter than the {resume_at} bytes its checkpoint recorded")
            os.truncate(self.path, resume_at)
            append = True
        if append:
            _drop_torn_tail(self.path)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        self._lines = 0
        self.sinks = list(sinks)

    @property
    def lines_written(self) -> int:
        """Number of records written by this logger."""
        return self._lines

    @property
    def closed(self) -> bool:
        return self._file.closed

    def log(self, record: dict) -> None:
        """Append one record as a JSON line (keys in insertion order) and flush."""
        if self._file.closed:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        clean = {}
        for key, value in record.items():
            if not isinstance(key, str):
                raise TypeError(f"metric key {key!r} is not a str")
            clean[key] = _jsonable(value, key)
        line = json.dumps(clean, allow_nan=False, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        self._lines += 1
        for sink in self.sinks:
            sink.log(clean, clean.get("step", self._lines))

    def log_samples(self, phase: str | None, step: int, rows: list[dict]) -> None:
        """Send a table of rows {prompt, response, reward} to the sinks (nothing goes to metrics.jsonl)."""
        for sink in self.sinks:
            sink.samples(phase, step, rows)

    def offset(self) -> int:
        """Bytes written so far, flushed and fsynced (a checkpoint records it to resume the file exactly)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        """Close the file and the sinks; safe to call twice."""
        self._file.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl file into a list of dicts (blank lines are skipped; posttrain.data.jsonl reads it).

    Raises:
        DataError (a ValueError): naming the file and 1-based line number of a line that is not a JSON object.
    """
    records = []
    for where, record in iter_jsonl(Path(path)):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
