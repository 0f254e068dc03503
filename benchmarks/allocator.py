"""Page faults in a SmolLM2 GRPO step, and PyTorch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE).

    python benchmarks/allocator.py [--pairs 2] [--steps 2] [--new 128]

Every tensor of a few MiB or more that the step allocates comes from pages the kernel maps on first touch: glibc
returns large blocks to the system when they are freed (mmap above its threshold, trimming of the heap top), so
the next micro-batch's activations, the head's (n, V) log-softmax chunks and their gradients fault in again, one
4 KiB page at a time, and each page is zeroed. PyTorch's CPU allocator aligns allocations of 2 MiB or more to
2 MiB and asks the kernel for huge pages for them (madvise) when THP_MEM_ALLOC_ENABLE=1 is in the environment
before torch is imported. posttrain does not set it: the A/B below gave 1.04x with the two settings' pairs
in opposite order, within this machine's drift (docs/performance.md, "Page faults"); its prefill avoids the faults
by running in passes of ~2k tokens instead (models/lean.py PREFILL_TOKENS).

This script runs the GRPO step of benchmarks/real_model.py (GSM8K, 8 prompts x 4 samples, fp32, <= --new tokens)
in fresh processes, alternately without and with the setting (A B A B ...: machine load hits both alike), --steps
steps each after one warm-up step, and prints per setting the median step time and its phases, the minor page
faults per step (getrusage) and the process's peak RSS. Needs `make real-model`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(steps: int, new: int) -> dict:
    import resource
    import tempfile
    import time

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import real_model as rm

    torch.set_num_threads(rm.THREADS)
    path = REPO / "models" / "smollm2-135m-instruct"
    model, tok = rm.load(path)
    cfg = rm.run_config(path, Path(tempfile.mkdtemp()), "float32", "gsm8k", new)
    step, _ = rm.posttrain_step(cfg, model, tok)
    step()  # warm-up: the first step's allocations fault in under either setting
    rows = []
    for _ in range(steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        metrics = step()
        rows.append({"s": time.perf_counter() - start,
                     "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                     **{k[5:]: v for k, v in metrics.items() if k.startswith("time/")}})
    return {"rows": rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2, help="A B pairs of processes")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up step")
    p.add_argument("--new", type=int, default=128, help="max new tokens per response")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.new)))
        return
    if not (REPO / "models" / "smollm2-135m-instruct" / "config.json").exists():
        sys.exit("allocator.py: models/smollm2-135m-instruct is missing; run `make real-model` first")
    print(f"transparent huge pages: {Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()}")
    results: dict[str, list] = {"0": [], "1": []}
    peaks: dict[str, list] = {"0": [], "1": []}
    for pair in range(args.pairs):
        for setting in ("0", "1"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting, "PYTHONPATH": str(REPO)}
            out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--new",
                                  str(args.new)], env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[setting] += res["rows"]
            peaks[setting].append(res["peak_rss_mib"])
            print(f"pair {pair} THP_MEM_ALLOC_ENABLE={setting}: "
                  + ", ".join(f"{r['s']:.1f} s ({r['faults']} faults)" for r in res["rows"])
                  + f"; peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    med = {s: statistics.median(r["s"] for r in rows) for s, rows in results.items()}
    for s, rows in results.items():
        phases = {k: round(statistics.median(r[k] for r in rows), 1) for k in ("generate", "reference", "update")}
        print(f"THP_MEM_ALLOC_ENABLE={s}: step {med[s]:.1f} s (median of {len(rows)}), phases {phases}, "
              f"faults/step {statistics.median(r['faults'] for r in rows):.0f}, peak RSS {max(peaks[s]):.0f} MiB")
    print(f"step time without / with: {med['0'] / med['1']:.3f}x")


if __name__ == "__main__":
    main()
