"""Reward functions: the protocol, weighted composition, and scoring that survives a failing function.

A reward function is a plain callable, as in TRL:

    fn(prompts: list[str], completions: list[str], **task_fields) -> list[float | None]

`task_fields` are per-sample columns (each a list as long as `completions`), such as `answer=[...]` or
`test_list=[...]`; a function takes the ones it needs and ignores the rest (`**_`). None means "does not apply
to this sample" (a code reward on a math prompt). `RewardSet` combines several with weights and scores a batch:

    total_i = sum_f w_f * r_f,i  over the functions f that scored sample i   (`default` if none did)

An exception inside a function is caught, the batch is re-scored one sample at a time to find the samples that
raise, each is logged with its sample and counted in `reward/errors`, and the run goes on: the failed samples
get None from that function. A NaN or infinite value, or a value that is not a number, is an error too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **task_fields) -> list[float | None]: ...


@dataclass(frozen=True)
class RewardBreakdown:
    """A scored batch of B samples."""

    rewards: list[float]  # (B,) weighted total per sample
    components: dict[str, list[float | None]]  # name -> (B,) that function's value; None: not applicable or error
    errors: dict[str, int]  # name -> samples where the function raised or returned a non-finite value
    metrics: dict[str, float]  # reward/errors, reward/<name>, reward/<name>/errors, reward/<name>/applicable


def reward_name(fn: Callable) -> str:
    """`fn.__name__`, or for a functools.partial the wrapped function's name, or the class name."""
    inner = getattr(fn, "func", fn)
    return getattr(fn, "__name__", None) or getattr(inner, "__name__", None) or type(fn).__name__


def _check(value) -> float | None:
    """A finite float, None, or ValueError."""
    if value is None:
        return None
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"reward must be a number or None, got {type(value).__name__}")
    try:
        value = float(value)  # numpy and torch scalars too
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward must be a number or None: {exc}") from None
    if not math.isfinite(value):
        raise ValueError(f"reward is not finite: {value}")
    return value


def _sample_fields(fields: Mapping[str, Sequence], i: int) -> dict[str, list]:
    return {k: [v[i]] for k, v in fields.items()}


def _snippet(text, n: int = 200) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def safe_call(fn: RewardFn, name: str, prompts: list[str], completions: list[str],
              fields: Mapping[str, Sequence]) -> tuple[list[float | None], int]:
    """`fn` on the batch, with failures isolated per sample: (values, number of errors).

    The whole batch is tried first (a sandboxed code reward runs its candidates in parallel); if that raises or
    returns a list of the wrong length, each sample is scored alone. A failed sample's value is None.
    """
    B = len(completions)
    try:
        out = list(fn(prompts, completions, **fields))
        if len(out) != B:
            raise ValueError(f"returned {len(out)} values for {B} completions")
    except Exception as exc:  # noqa: BLE001 - a reward function must not stop the run
        log.warning("reward %s failed on the batch (%s: %s); scoring its %d samples one by one",
                    name, type(exc).__name__, exc, B)
        out = []
        for i in range(B):
            try:
                one = list(fn([prompts[i]], [completions[i]], **_sample_fields(fields, i)))
                if len(one) != 1:
                    raise ValueError(f"returned {len(one)} values for 1 completion")
                out.append(one[0])
            except Exception as exc:  # noqa: BLE001
                _log_error(name, i, prompts[i], completions[i], exc)
                out.append(_Error)
    values, errors = [], 0
    for i, v in enumerate(out):
        if v is _Error:
            values.append(None)
            errors += 1
            continue
        try:
            values.append(_check(v))
        except ValueError as exc:
            _log_error(name, i, prompts[i], completions[i], exc)
            values.append(None)
            errors += 1
    return values, errors


class _Error:
    """Marks a sample whose reward raised (already logged)."""


def _log_error(name: str, i: int, prompt, completion, exc: BaseException) -> None:
    log.warning("reward %s: sample %d: %s: %s | prompt: %r | completion: %r", name, i, type(exc).__name__, exc,
                _snippet(prompt), _snippet(completion))


class RewardSet:
    """Several reward functions with weights, scored safely. Itself a reward function (returns the totals).

        rewards = RewardSet({"correct": math_reward, "format": (tag_format_reward("answer"), 0.1)})
        scores = rewards.score(prompts, completions, answer=answers)
        scores.rewards, scores.metrics["reward/errors"], scores.metrics["reward/correct"]
    """

    def __init__(self, fns: Mapping[str, RewardFn | tuple[RewardFn, float]] | Sequence[RewardFn],
                 default: float = 0.0):
        """`fns`: name -> function or (function, weight) (weight 1 when omitted), or a list of functions named by
        `reward_name`. `default`: the total of a sample no function scored."""
        if not isinstance(fns, Mapping):
            fns = list(fns)
            names = [reward_name(f) for f in fns]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"reward functions share the name {dupes[0]!r}; pass a dict to name them")
            fns = dict(zip(names, fns))
        if not fns:
            raise ValueError("RewardSet needs at least one reward function")
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        for name, entry in fns.items():
            fn, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
            if not callable(fn) or not math.isfinite(weight):
                raise ValueError(f"reward {name!r}: expected a callable and a finite weight")
            self.fns[name], self.weights[name] = fn, float(weight)
        self.default = float(default)
        self.__name__ = "+".join(self.fns)

    def __call__(self, prompts: list[str], completions: list[str], **task_fields) -> list[float]:
        return self.score(prompts, completions, **task_fields).rewards

    def score(self, prompts: list[str], completions: list[str], **task_fields) -> RewardBreakdown:
        """Every function on the batch; the weighted totals, each function's values, errors and metrics."""
        B = len(completions)
        if len(prompts) != B:
            raise ValueError(f"{len(prompts)} prompts for {B} completions")
        for key, column in task_fields.items():
            if len(column) != B:
                raise ValueError(f"task field {key!r} has {len(column)} values for {B} completions")
        components, errors = {}, {}
        for name, fn in self.fns.items():
            components[name], errors[name] = safe_call(fn, name, prompts, completions, task_fields)
        rewards = []
        for i in range(B):
            scored = [(self.weights[n], c[i]) for n, c in components.items() if c[i] is not None]
            rewards.append(sum(w * v for w, v in scored) if scored else self.default)
        return RewardBreakdown(rewards, components, errors, reward_metrics(rewards, components, errors))


def reward_metrics(rewards: list[float], components: Mapping[str, list[float | None]],
                   errors: Mapping[str, int]) -> dict[str, float]:
    """`reward/errors` (total errors), `reward/total` (mean total), and per function `reward/<name>` (mean over the
    samples it scored; NaN if none), `reward/<name>/errors`, `reward/<name>/applicable` (fraction it scored)."""
    B = len(rewards)
    metrics = {"reward/errors": float(sum(errors.values())),
               "reward/total": sum(rewards) / B if B else float("nan")}
    for name, values in components.items():
        scored = [v for v in values if v is not None]
        metrics[f"reward/{name}"] = sum(scored) / len(scored) if scored else float("nan")
        metrics[f"reward/{name}/errors"] = float(errors[name])
        metrics[f"reward/{name}/applicable"] = len(scored) / B if B else float("nan")
    return metrics
