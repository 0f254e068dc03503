"""Start-up (issue 23, item 5): how long the CLI takes before it does anything, and where that time goes.

    python benchmarks/startup.py [--runs 3] [--top 15]

Rows (each the median of --runs subprocess runs, wall clock from just before the process is started):
  --help        `posttrain --help`
  config error  `posttrain rl configs/demo.yaml rl.bogus=1` (one line, exit code 2)
  first step    `posttrain demo` until its first SFT optimizer step has ended: the demo runs with
                `sft.log_every=1` (the first record of metrics.jsonl is then written right after step 1) into a
                temporary --output-dir, the file's modification time is the end of the step, and the process is
                killed there. No hook in the code: the record is the one the demo writes anyway.
  floor         `import torch`, and `import torch` plus what the first `torch.optim` optimizer imports
                (torch._dynamo, through `torch._compile._disable_dynamo` on `add_param_group`): no training
                step can start before these.

Then the import breakdown of one more first-step run (`python -X importtime`, the same command, killed at the same
point): self time summed per top-level package (no overlaps), and the largest imports by cumulative time, each
with the posttrain module (or function-level import) that made it. Times on a shared machine are noisy: the load
average is printed with the table. Results and what they mean: docs/performance.md, "Start-up".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from posttrain.cli import main; sys.exit(main())"]  # = the console script
FIRST_STEP_OVERRIDES = ["sft.log_every=1"]
TORCH_OPTIMIZER = "import torch; torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())"


def timed(cmd: list[str], expect: int) -> float:
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.time() - start
    if r.returncode != expect:
        raise RuntimeError(f"{cmd[-3:]} exited {r.returncode}, expected {expect}:\n{r.stderr[-2000:]}")
    return seconds


def first_sft_record(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return None  # being written
                record = json.loads(line)
                if record.get("phase") == "sft" and "loss" in record:
                    return record
    except FileNotFoundError:
        return None
    return None


def first_step(env: dict | None = None, timeout: float = 300.0) -> tuple[float, str]:
    """(seconds from process start to the end of the first SFT step, the process's stderr)."""
    tmp = Path(tempfile.mkdtemp(prefix="posttrain-startup-"))
    out, metrics = tmp / "run", tmp / "run" / "metrics.jsonl"
    err = open(tmp / "stderr.txt", "w+", encoding="utf-8")
    try:
        start = time.time()
        proc = subprocess.Popen([*CLI, "demo", "--output-dir", str(out), *FIRST_STEP_OVERRIDES], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
        while True:
            record = first_sft_record(metrics)
            if record is not None:
                end = metrics.stat().st_mtime  # the write of the first record (one record: the step took longer
                break                          # than this loop's 2 ms)
            if proc.poll() is not None or time.time() - start > timeout:
                err.seek(0)
                raise RuntimeError(f"posttrain demo ended before its first SFT step:\n{err.read()[-3000:]}")
            time.sleep(0.002)
        if record["step"] != 1:
            raise RuntimeError(f"first SFT record is step {record['step']}, expected 1")
        os.kill(proc.pid, signal.SIGKILL)  # SIGTERM would save a checkpoint first (posttrain/train/control.py)
        proc.wait()
        err.seek(0)
        return end - start, err.read()
    finally:
        err.close()
        shutil.rmtree(tmp, ignore_errors=True)


def parse_importtime(text: str) -> list[tuple[int, int, str]]:
    """`-X importtime` lines -> [(depth, cumulative us, module)] in the order printed (children first)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        rows.append(((len(name) - len(name.lstrip(" "))) // 2, int(cumulative), name.strip()))
    return rows


def import_roots(rows: list[tuple[int, int, str]]) -> list[tuple[float, str, str]]:
    """Third-party (and stdlib) imports made directly by a posttrain module or by a function (depth 0), as
    (cumulative seconds, importer, module), largest first. A module's parent is the next row printed at a
    lower depth."""
    out = []
    for i, (depth, cumulative, name) in enumerate(rows):
        if name.split(".")[0] == "posttrain":
            continue
        parent = next((r[2] for r in rows[i + 1:] if r[0] < depth), None)
        if parent is None or parent.split(".")[0] == "posttrain":
            out.append((cumulative / 1e6, parent or "(a function)", name))
    return sorted(out, reverse=True)


def by_package(text: str) -> list[tuple[float, str]]:
    """Self import time summed per top-level package, largest first: a breakdown without overlaps (a lazy import
    resolved inside another module's import counts where it runs)."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, _, name = line[len("import time:"):].split("|")
            package = name.strip().split(".")[0]
            totals[package] = totals.get(package, 0) + int(own)
    return sorted(((us / 1e6, name) for name, us in totals.items()), reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    load_start = os.getloadavg()
    rows = {
        "posttrain --help": [timed([*CLI, "--help"], 0) for _ in range(args.runs)],
        "config error (rl.bogus=1)": [timed([*CLI, "rl", "configs/demo.yaml", "rl.bogus=1"], 2)
                                      for _ in range(args.runs)],
        "demo: first SFT step ends": [first_step()[0] for _ in range(args.runs)],
        "floor: import torch": [timed([sys.executable, "-c", "import torch"], 0) for _ in range(args.runs)],
        "floor: import torch + first optimizer": [timed([sys.executable, "-c", TORCH_OPTIMIZER], 0)
                                                  for _ in range(args.runs)],
    }
    seconds, stderr = first_step({**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    imports = parse_importtime(stderr)
    load_end = os.getloadavg()
    print(f"posttrain start-up, {os.cpu_count()} cores, load average {load_start[0]:.2f} at the start, "
          f"{load_end[0]:.2f} at the end; median of {args.runs} runs")
    print()
    print("| measurement | median | runs |")
    print("|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} s | {', '.join(f'{v:.2f}' for v in values)} |")
    print()
    total = sum(c for d, c, _ in imports if d == 0) / 1e6
    print(f"Imports of `posttrain demo` up to its first SFT step (-X importtime, that run {seconds:.2f} s, "
          f"of which imports {total:.2f} s; cumulative, so nested rows overlap):")
    print()
    packages = by_package(stderr)
    shown = packages[:8]
    print("| package (self time, summed) | " + " | ".join(name for _, name in shown) + " | the rest |")
    print("|---" * (len(shown) + 2) + "|")
    print(f"| {total:.2f} s | " + " | ".join(f"{t:.2f} s" for t, _ in shown)
          + f" | {sum(t for t, _ in packages[8:]):.2f} s |")
    print()
    print("| cumulative | module | imported by |")
    print("|---|---|---|")
    for cumulative, parent, name in import_roots(imports)[:args.top]:
        print(f"| {cumulative:.3f} s | {name} | {parent} |")


if __name__ == "__main__":
    main()
