"""Code rewards: take the program out of a completion and run it with its tests in the sandbox.

The candidate code never runs in this process: every sample is a separate sandboxed interpreter (see
posttrain/sandbox), a batch runs on a small pool. A sample the sandbox itself could not run
(`sandbox_error`) raises, so `RewardSet` counts it as an error instead of scoring the model 0 for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from posttrain.sandbox import (
    ExecResult,
    SandboxConfig,
    run_humaneval,
    run_many,
    run_mbpp,
)

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python, ```py or bare ```); an unclosed final fence counts (a truncated
    generation); without fences, the whole completion."""
    blocks = _FENCE_RE.findall(completion)
    if blocks:
        return blocks[-1]
    tail = _OPEN_FENCE_RE.search(completion)
    return tail.group(1) if tail else completion


class SandboxFailure(RuntimeError):
    """The sandbox could not run a sample (not the program's fault)."""


def _score(results: list[ExecResult | None], partial_credit: bool) -> list[float | None]:
    failed = [r.error for r in results if r is not None and r.status == "sandbox_error"]
    if failed:
        raise SandboxFailure(f"{len(failed)} sample(s) could not be run: {failed[0]}")
    return [None if r is None else (r.pass_fraction if partial_credit else float(r.passed)) for r in results]


def _run(jobs: list, workers: int) -> list[ExecResult | None]:
    """Run the non-None jobs on the pool, keeping None (not applicable) in place."""
    todo = [j for j in jobs if j is not None]
    done = iter(run_many(todo, workers=workers))
    return [None if j is None else next(done) for j in jobs]


def code_tests_reward(config: SandboxConfig = SandboxConfig(), workers: int = 2, partial_credit: bool = False):
    """MBPP-style reward: the completion's code, then `test_setup_code`, then each assert of `test_list`.

    Returns fn(prompts, completions, test_list, test_setup_code=None, **_) -> 1.0 if every test passes
    (the fraction of tests passed with `partial_credit`), 0.0 otherwise, None where `test_list` is None.
    """

    def code_tests(prompts: list[str], completions: list[str], test_list: Sequence[Sequence[str] | None],
                   test_setup_code: Sequence[str | None] | None = None, **_) -> list[float | None]:
        setups = test_setup_code if test_setup_code is not None else [""] * len(completions)
        jobs = [None if tests is None else
                functools.partial(run_mbpp, extract_code(c), list(tests), setup or "", config)
                for c, tests, setup in zip(completions, test_list, setups, strict=True)]
        return _score(_run(jobs, workers), partial_credit)

    return code_tests


def humaneval_program(code_prompt: str, completion: str, entry_point: str) -> str:
    """The program to test: the completion's code after the HumanEval prompt (signature and docstring). A
    completion that defines `entry_point` itself replaces the prompt's stub, which stays above it for its imports."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return code_prompt + "\n    pass\n\n" + code
    return code_prompt + code


def humaneval_reward(config: SandboxConfig = SandboxConfig(), workers: int = 2):
    """HumanEval-style reward: `prompt` + completion, then `test` and `check(entry_point)`.

    Returns fn(prompts, completions, test, entry_point, prompt=None, **_) -> 1.0 / 0.0, None where `test` is
    None. `prompt` is the dataset's code prompt; the RL prompts stand in for it when absent.
    """

    def humaneval(prompts: list[str], completions: list[str], test: Sequence[str | None],
                  entry_point: Sequence[str], prompt: Sequence[str] | None = None, **_) -> list[float | None]:
        code_prompts = prompt if prompt is not None else prompts
        jobs = [None if t is None else
                functools.partial(run_humaneval, "", humaneval_program(p, c, e), t, e, config)
                for p, c, t, e in zip(code_prompts, completions, test, entry_point, strict=True)]
        return _score(_run(jobs, workers), partial_credit=False)

    return humaneval
