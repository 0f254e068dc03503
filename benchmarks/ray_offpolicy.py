"""Off-policy rollouts on backend ray: time per RL step with ray.max_staleness=1 against 0 on this machine.

    python benchmarks/ray_offpolicy.py [--steps 8] [--prompts 32] [--group 8] [--new-tokens 6] [--model PATH]

The demo's GRPO step (the tiny Llama, 32 prompts x 8 samples, up to 6 new tokens; `--model` an SFT model such
as a demo run's sft/ directory, else the random initialisation) on a local Ray instance: 2 rollout workers, 1
learner rank, scoring in the driver, one torch thread per actor. Two runs, identical but for ray.max_staleness
(0, and 1 with rl.rollout_correction=tis), each with its own actors on the same instance (ray.cpus = max(cores,
3) logical CPUs, so that both sets exist at once; only one works at a time), step alternately, so that a change
in the machine's load hits both alike. Step 1 is a warm-up (and has nothing to overlap). Reports per run the
median wall time per step and per phase (time/<phase>: with max_staleness 1, `generate` and `score` are the
next step's batch, made while the learner rank trains, and `update` is only the wait beyond them), the median
ratio of the back-to-back pairs, the cores and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from posttrain.config import build_config
from posttrain.distributed.cluster import ray_session, start_ray_cluster
from posttrain.models import load_policy
from posttrain.rl.loop import RLRun, rl_step
from posttrain.tasks import ArithmeticTask
from posttrain.train.optim import PhaseTimer

PHASES = ("generate", "score", "reference", "advantages", "update", "sync")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--model", default=None, help="an SFT model directory (default: the random tiny Llama)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    common = ["backend=ray", f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
              f"rl.max_new_tokens={args.new_tokens}", f"rl.steps={args.steps}", f"ray.cpus={max(cores, 3)}",
              "ray.num_rollout_workers=2", "ray.num_learners=1", "ray.num_reward_workers=0",
              "ray.threads_per_worker=1", "threads=1", *([f"model.path={args.model}"] if args.model else [])]
    cfgs = {k: build_config(None, [*common, f"ray.max_staleness={k}",
                                   *(["rl.rollout_correction=tis"] if k else [])]) for k in (0, 1)}
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    steps: dict[int, list[float]] = {0: [], 1: []}
    phases: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    lags: dict[int, list[int]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="ro-", dir="/tmp") as out, ray_session(cfgs[0], out):
        runs = {}
        for k, cfg in cfgs.items():
            model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
            task = ArithmeticTask(cfg.task, cfg.seed)
            runs[k] = RLRun.create(cfg, start_ray_cluster(cfg, model, tokenizer, task), task)
        try:
            for step in range(1, args.steps + 1):
                for k, run in runs.items():
                    timer = PhaseTimer()
                    start = time.perf_counter()
                    metrics, _ = rl_step(run, step, timer)
                    seconds = time.perf_counter() - start
                    lags[k].append(metrics["policy_lag"])
                    if step > 1:
                        steps[k].append(seconds)
                        for name, value in timer.pop().items():
                            phases[k].setdefault(name[5:], []).append(value)
        finally:
            for run in runs.values():
                run.roles.shutdown()
    load_after = os.getloadavg()
    ratio = statistics.median(b / a for a, b in zip(steps[0], steps[1]))
    print(f"GRPO step: {args.prompts * args.group} sequences ({args.prompts} prompts x {args.group}), up to "
          f"{args.new_tokens} new tokens, tiny Llama ({'SFT model ' + args.model if args.model else 'random init'}); "
          f"2 rollout workers, 1 learner rank, 1 thread each; median of steps 2..{args.steps}")
    print(f"cores: {cores}; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'max_staleness':<15}{'s/step':>8}" + "".join(f"{p:>12}" for p in PHASES) + "   policy_lag")
    for k in (0, 1):
        cells = "".join(f"{statistics.median(phases[k].get(p, [0.0])):>12.3f}" for p in PHASES)
        print(f"{k:<15}{statistics.median(steps[k]):>8.3f}{cells}   {lags[k]}")
    print(f"max_staleness 1 / 0, median of the {len(steps[0])} back-to-back pairs: {ratio:.2f}x the time per step")


if __name__ == "__main__":
    main()
