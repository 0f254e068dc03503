"""Format rewards (a required answer tag or layout) and length penalties. Factories return reward functions."""

from __future__ import annotations

import re
from collections.abc import Sequence


def tag_format_reward(tag: str = "answer", score: float = 1.0):
    """Reward `score` when the completion has exactly one non-empty `<tag>...</tag>`, else 0."""
    pattern = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)

    def tag_format(prompts: list[str], completions: list[str], **_) -> list[float]:
        out = []
        for c in completions:
            found = pattern.findall(c)
            out.append(score if len(found) == 1 and found[0].strip() else 0.0)
        return out

    tag_format.__name__ = f"{tag}_tag_format"
    return tag_format


def layout_reward(pattern: str, score: float = 1.0, name: str = "layout"):
    """Reward `score` when the whole completion (surrounding whitespace stripped) matches the regex `pattern`,
    e.g. `r"<think>.*?</think>\\s*<answer>.*?</answer>"` (DeepSeek-R1's layout); `.` matches newlines."""
    compiled = re.compile(pattern, re.DOTALL)

    def layout(prompts: list[str], completions: list[str], **_) -> list[float]:
        return [score if compiled.fullmatch(c.strip()) else 0.0 for c in completions]

    layout.__name__ = name
    return layout


THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def overlong_penalty(max_length: int, buffer: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L = the completion's length:

        0                                  L <= max_length - buffer
        ((max_length - buffer) - L) / buffer   max_length - buffer < L <= max_length   (0 down to -1)
        -1                                 L > max_length

    L is the task field `completion_lengths` (tokens) when given, else the completion's length in characters.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong_penalty needs 0 < buffer <= max_length, got buffer={buffer}, "
                         f"max_length={max_length}")
    start = max_length - buffer

    def overlong(prompts: list[str], completions: list[str], completion_lengths: Sequence[int] | None = None,
                 **_) -> list[float]:
        lengths = completion_lengths if completion_lengths is not None else [len(c) for c in completions]
        out = []
        for n in lengths:
            if n <= start:
                out.append(0.0)
            elif n <= max_length:
                out.append((start - n) / buffer)
            else:
                out.append(-1.0)
        return out

    overlong.__name__ = "overlong_penalty"
    return overlong
