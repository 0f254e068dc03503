"""Sandbox throughput on real code: every MBPP reference solution against its own tests.

    .venv/bin/python benchmarks/sandbox_mbpp.py [--path ../shared/data/mbpp/mbpp.jsonl] [--workers 2] [--limit N]

Prints executions per second and every reference that does not pass, with its reason.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
from pathlib import Path

from posttrain.sandbox import SandboxConfig, probe, run_many, run_mbpp

DEFAULT_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.path.read_text().splitlines() if line.strip()]
    rows = rows[:args.limit] if args.limit else rows
    cfg = SandboxConfig(timeout_s=args.timeout)
    jobs = [functools.partial(run_mbpp, r["code"], r["test_list"], r["test_setup_code"], cfg) for r in rows]
    start = time.perf_counter()
    results = run_many(jobs, workers=args.workers)
    elapsed = time.perf_counter() - start
    print(f"isolation: {probe()[0]} ({probe()[1]})")
    print(f"{len(rows)} MBPP references, {args.workers} workers: {elapsed:.1f} s, "
          f"{len(rows) / elapsed:.1f} executions/s, mean {sum(r.duration_s for r in results) / len(rows):.3f} s each")
    print("statuses:", dict(collections.Counter(r.status for r in results)))
    for row, r in zip(rows, results):
        if not r.passed:
            print(f"  task {row['task_id']}: {r.status}: {r.error}")
    wrong = run_many([functools.partial(run_mbpp, "def _():\n    return None\n", r["test_list"], r["test_setup_code"],
                                        cfg) for r in rows[:50]], workers=args.workers)
    print(f"a wrong solution (`return None`) on the first {len(wrong)} tasks: "
          f"{sum(r.passed for r in wrong)} passed")


if __name__ == "__main__":
    main()
