"""SIGKILL a training run at random moments, resume it each time, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py [--kills 20] [--seed 0]

Runs `posttrain demo` (SFT then GRPO) on a tiny config with a checkpoint after every step: once straight
through, then again killed with SIGKILL at random points and restarted with --resume until it completes.
Prints, for every kill, where the run was and where it resumed; exit code 1 unless the final weights and
metrics.jsonl (timings aside) equal the uninterrupted run's bit for bit. tests/test_kill_resume.py runs the
same with 5 kills.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ holds the harness
from tests.kill_resume_harness import kill_and_resume  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/kill_resume")
    args = p.parse_args()
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    result = kill_and_resume(Path(args.workdir), args.kills, args.seed)
    print(json.dumps(result, indent=1))
    return 0 if result["equal_weights"] and result["equal_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
