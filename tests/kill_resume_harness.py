"""SIGKILL a training run at random moments, resume it each time, and compare with an uninterrupted run: the
harness of tests/test_kill_resume.py (5 kills) and benchmarks/kill_resume.py (20).

Runs `posttrain demo` (SFT then GRPO) on a tiny config with a checkpoint after every step: once straight
through, then again killed with SIGKILL at random points and restarted with --resume until it completes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

TIMING = ("time/", "tokens_per_s")
TINY = {
    "seed": 0, "threads": 1, "progress": False,
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
    "task": {"max_operand": 20, "num_eval": 20},
    "sft": {"steps": 30, "batch_size": 16, "warmup_steps": 2, "eval_every": 10, "log_every": 1},
    "rl": {"steps": 24, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "warmup_steps": 1,
           "eval_every": 4},
    "eval": {"batch_size": 20, "max_new_tokens": 4},
    "checkpoint": {"every": 1, "keep": 2},
}


def command(config: Path, out: Path, resume: bool) -> list[str]:
    exe = Path(sys.executable).with_name("posttrain")
    return [str(exe), "demo", "--config", str(config), "--output-dir", str(out), *(["--resume"] if resume else [])]


def sequence(name: str) -> int:
    return int(name[:6]) if name[:6].isdigit() else 0


def strip_timing(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in lines]


def newest_checkpoint(out: Path) -> str:
    root = out / "checkpoints"
    try:
        names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        names = []
    return names[-1] if names else "none"


def kill_and_resume(workdir: Path, kills: int, seed: int, log=print, tiny: dict = TINY, argv=command,
                    total: int | None = None) -> dict:
    """Returns {"kills": n, "equal_weights": bool, "equal_metrics": bool, "resumes": [...], "seconds": s}.
    `tiny`, `argv(config, out, resume)` and `total` (checkpoints a run writes) run another command (default: the
    demo); the weights compared are every final/**/*.safetensors (a LoRA run's final/adapter/ too)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    ref = workdir / "straight"
    subprocess.run(argv(config, ref, False), check=True, env=env, capture_output=True)
    straight_s = time.perf_counter() - t0
    rng = random.Random(seed)
    total = total or TINY["sft"]["steps"] + TINY["rl"]["steps"]  # one checkpoint per step
    targets = sorted(rng.sample(range(1, total - 1), kills))
    out = workdir / "killed"
    resumes, done, n = [], False, 0
    while not done:
        proc = subprocess.Popen(argv(config, out, n > 0), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if n < kills:
            # wait until the run has saved its targets[n]-th checkpoint (targets spread over SFT and RL), then
            # kill it a random moment later: mid-step, mid-checkpoint-write or mid-evaluation
            while proc.poll() is None and sequence(newest_checkpoint(out)) < targets[n]:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                n += 1
                resumes.append(newest_checkpoint(out))
                log(f"kill {n}: newest checkpoint {resumes[-1]}")
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the resumed run failed ({proc.returncode}): {err[-500:]}")
        done = True
    files = sorted(f.relative_to(ref) for f in (ref / "final").rglob("*.safetensors"))
    same_weights = bool(files) and all((ref / f).read_bytes() == (out / f).read_bytes() for f in files)
    same_metrics = strip_timing(ref / "metrics.jsonl") == strip_timing(out / "metrics.jsonl")
    return {"kills": n, "equal_weights": same_weights, "equal_metrics": same_metrics, "resumes": resumes,
            "straight_seconds": round(straight_s, 1), "seconds": round(time.perf_counter() - t0, 1)}
