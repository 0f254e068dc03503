"""Rollout throughput of backend ray: tokens per second with 1 and with 2 rollout workers on this machine.

    python benchmarks/ray_throughput.py [--repeats 5] [--prompts 32] [--group 8] [--new-tokens 16]

The demo's tiny Llama (hidden 128, 4 layers, fp32) samples one rollout batch (prompts x group sequences, the
demo's 32 x 8 by default) of arithmetic prompts. Each Ray rollout worker reserves one CPU and runs one torch
thread; the batch is split into equal shares, one per worker, exactly as `posttrain rl ... backend=ray` does
(RayRole.submit / gather around RolloutWorker.generate), so the time includes sending the prompts and
returning the shares. The 1-worker and the 2-worker set-up are measured alternately, batch by batch, so that a
change in the machine's load hits both alike (the local instance offers max(cores, 3) logical CPUs so that both
sets of actors exist at once; only one set works at a time). For comparison the same worker class runs in this
process with 1 and with 2 torch threads. Reports the median of `--repeats` batches (after one warm-up), the
median ratio of the back-to-back pairs, the cores, and the load average, since other processes on the machine
take cores too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from posttrain.config import build_config
from posttrain.distributed.cluster import ray_session
from posttrain.rollout.engines import shard_seed
from posttrain.distributed.pool import RayRole
from posttrain.rl.roles import RestartBudget
from posttrain.rl.roles import split_even as _split
from posttrain.rl.workers import RolloutWorker
from posttrain.models import load_policy
from posttrain.tasks import ArithmeticTask


def tokens(batches) -> int:
    return int(sum(b.response_mask.sum() for b in batches))


def in_process(cfg, model, tokenizer, prompts, threads: int, repeats: int) -> float:
    worker = RolloutWorker(cfg, model, tokenizer)
    torch.set_num_threads(threads)
    worker.generate(prompts, 0)  # warm-up
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        n = tokens([worker.generate(prompts, shard_seed(cfg.seed, r + 1, 0, 0))])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def on_ray(cfg, model, tokenizer, prompts, repeats: int) -> tuple[list[float], list[float]]:
    """tokens/s of one rollout worker and of two, measured alternately (batch by batch), so that a change in the
    machine's load hits both alike."""
    import ray  # noqa: PLC0415

    model_ref, tok_ref = ray.put(model), ray.put(tokenizer)
    roles = [RayRole("rollout worker", RolloutWorker, n, (cfg, model_ref, tok_ref), {"num_cpus": 1}, cfg.ray,
                     RestartBudget(0)) for n in (1, 2)]
    try:
        for role in roles:
            role.wait_ready()
        rates: tuple[list[float], list[float]] = ([], [])
        for r in range(repeats + 1):  # the first round warms up
            for role, out in zip(roles, rates):
                shares = _split(prompts, len(role))
                start = time.perf_counter()
                batches = role.gather([role.submit(s, "generate", share, shard_seed(cfg.seed, r, 0, s))
                                       for s, share in enumerate(shares)])
                if r:
                    out.append(tokens(batches) / (time.perf_counter() - start))
        return rates
    finally:
        for role in roles:
            role.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    cfg = build_config(None, ["backend=ray", f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
                              f"rl.max_new_tokens={args.new_tokens}", f"ray.cpus={max(cores, 3)}",
                              "ray.threads_per_worker=1", "model.max_position_embeddings=64"])
    model, tokenizer = load_policy(cfg.model, seed=0)
    task = ArithmeticTask(cfg.task, cfg.seed)
    import random  # noqa: PLC0415

    problems = task.sample_prompts(random.Random(0), args.prompts)
    prompts = [p.prompt for p in problems for _ in range(args.group)]
    load_before = os.getloadavg()
    rows = [("in process, 1 thread", in_process(cfg, model, tokenizer, prompts, 1, args.repeats)),
            ("in process, 2 threads", in_process(cfg, model, tokenizer, prompts, 2, args.repeats))]
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as out, ray_session(cfg, out):
        one, two = on_ray(cfg, model, tokenizer, prompts, args.repeats)
    rows += [("ray, 1 rollout worker", statistics.median(one)), ("ray, 2 rollout workers", statistics.median(two))]
    load_after = os.getloadavg()
    ratio = statistics.median(b / a for a, b in zip(one, two))
    one = rows[2][1]
    print(f"rollout batch: {len(prompts)} sequences ({args.prompts} prompts x {args.group}), up to {args.new_tokens} "
          f"new tokens, tiny Llama (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers), fp32, "
          f"median of {args.repeats}")
    print(f"cores: {cores}; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'setting':<26}{'tokens/s':>12}{'vs 1 worker':>14}")
    for name, rate in rows:
        print(f"{name:<26}{rate:>12,.0f}{rate / one:>13.2f}x")
    print(f"2 workers / 1 worker, median of the {args.repeats} back-to-back pairs: {ratio:.2f}x")


if __name__ == "__main__":
    main()
