"""Run many sandboxed executions at once: a small thread pool, one sandbox process per job.

Threads are enough: each job spends its time waiting on a child process, and `run_program` uses no
`preexec_fn`, so starting processes from several threads is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from posttrain.sandbox.config import ExecResult


def run_many(jobs: Sequence[Callable[[], ExecResult]], workers: int = 2) -> list[ExecResult]:
    """Call every zero-argument job (e.g. `functools.partial(run_mbpp, code, tests)`) with at most `workers`
    sandboxes running at a time; results come back in the order of `jobs`."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: job(), jobs))
