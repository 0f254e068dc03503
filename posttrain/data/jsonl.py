"""Reading JSON Lines files (plain or gzip) row by row, with errors that name the file and line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import DataError


def one_line(err: BaseException) -> str:
    """An exception as "Type: first line of its message"."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def iter_jsonl(path: Path, label: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every non-blank line of a (gzip-compressed) JSONL file, decoded and parsed one by one
    so that errors name the line: `where` is "<label> line <n>" (label: the path by default)."""
    label = str(path) if label is None else label
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{label} line {lineno}"
                try:
                    line = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: not UTF-8 text (byte {err.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip())
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                yield where, row
    except (OSError, EOFError) as err:  # a corrupt or truncated gzip stream (gzip.BadGzipFile is an OSError)
        # gzip reads ahead in blocks, so the line is where reading stopped, not necessarily the bad one
        raise DataError(f"{label} near line {lineno + 1}: cannot read: {one_line(err)}") from None
