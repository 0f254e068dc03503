"""LoRA against full fine-tuning on SmolLM2-135M-Instruct (issue 20): GRPO steps of the real-model demo's run
(configs/grpo_ifeval.yaml: ifeval, 8 prompts x 8 samples, <= 64 new tokens, 2 minibatches, no KL term), each
kind in its own process so that its peak RSS is its own.

    python benchmarks/lora.py [--steps 3] [--rank 16] [--kl 0.0] [--micro-batch 32] [--gradient-checkpointing]
                              [--threads 2] [--model models/smollm2-135m-instruct]

Per kind (full: every weight trains; lora: model.peft=lora, r = alpha / 2 = --rank on the seven projections):
  peak RSS    VmHWM of the worker after its steps (weights, gradients, AdamW moments, activations, KV cache)
  s/step      median wall time of the steps after the first (the first warms allocators and caches)
  trainable   trainable parameters (what has gradients and two AdamW moments)
  phases      mean seconds per named phase of the loop (generate, score, reference, update, ...)
  phase RSS   per phase, the highest RSS seen inside it over all steps (VmRSS sampled every 5 ms by a thread),
              and the RSS when the worker's steps began: where in the step each kind's peak sits
The learning rates are the demo's (1e-5) for full and 10x (1e-4) for LoRA (docs/peft.md); speed and memory do not
depend on them. --kl 0.04 adds a KL term: full fine-tuning then holds a frozen copy of the model as reference,
LoRA the same module with its adapter off. --micro-batch sets rl.micro_batch_size for both kinds (the demo's 32:
activations, common to both, are most of the peak; smaller micro-batches leave the part LoRA saves a larger share);
--gradient-checkpointing sets model.gradient_checkpointing for both (each layer recomputed in the backward pass).
The goal (issue 20): LoRA's peak RSS <= 0.7x full fine-tuning's.
Prints a table and writes benchmarks/.last-lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parent.parent
KINDS = ("full", "lora")


def config(kind: str, model: str, rank: int, kl: float, threads: int, out: Path, micro_batch: int = 32,
           checkpointing: bool = False):
    from posttrain.config import load_config

    overrides = [f"model.path={model}", f"threads={threads}", "progress=false", f"output_dir={out}",
                 f"rl.kl_coef={kl}", f"rl.micro_batch_size={micro_batch}",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    if kind == "lora":
        overrides += ["model.peft=lora", f"model.lora.r={rank}", f"model.lora.alpha={2 * rank}", "rl.lr=1e-4"]
    return load_config(REPO / "configs" / "grpo_ifeval.yaml", overrides)


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS) or at its peak (VmHWM), MiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _phase_rss_timer():
    """A PhaseTimer that also records, per phase, the highest RSS a sampling thread saw while the phase ran."""
    import contextlib
    import threading

    from posttrain.train.optim import PhaseTimer

    class RssPhaseTimer(PhaseTimer):
        def __init__(self) -> None:
            super().__init__()
            self.high: dict[str, float] = {}
            self._now = 0.0
            threading.Thread(target=self._sample, daemon=True).start()

        def _sample(self) -> None:
            while True:
                self._now = max(self._now, _rss_mib())
                time.sleep(0.005)

        @contextlib.contextmanager
        def __call__(self, name: str):
            outer, self._now = self._now, _rss_mib()  # a nested phase: the outer one's high so far is kept
            with super().__call__(name):
                yield
            high = max(self._now, _rss_mib())
            self.high[name] = max(self.high.get(name, 0.0), high)
            self._now = max(outer, high)

    return RssPhaseTimer()


def worker(kind: str, args) -> dict:
    import tempfile

    import torch

    from posttrain.models import load_policy
    from posttrain.models.precision import compute_dtype, precision
    from posttrain.rl.loop import RLRun
    from posttrain.tasks import build_task, fit_task

    cfg = config(kind, args.model, args.rank, args.kl, args.threads, Path(tempfile.mkdtemp()), args.micro_batch,
                 args.gradient_checkpointing)
    torch.set_num_threads(args.threads)
    model, tok = load_policy(cfg.model, cfg.seed)
    task = build_task(cfg.task, cfg.seed)
    fit_task(task, cfg, model, tok, cfg.rl.prompts_per_step)
    run = RLRun.local(cfg, model, tok, task)
    timer, seconds, phases = _phase_rss_timer(), [], []
    start_rss = _rss_mib()
    for _ in range(args.steps):
        start = time.perf_counter()
        with precision(cfg.model):
            metrics = run.step(timer)
        seconds.append(time.perf_counter() - start)
        phases.append(timer.pop())
    later = phases[1:] or phases
    return {"kind": kind, "peak_rss_mib": _rss_mib("VmHWM"),
            "s_per_step": statistics.median(seconds[1:] or seconds), "first_step_s": seconds[0],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()), "dtype": str(compute_dtype(cfg.model)),
            "phases": {k[5:]: round(statistics.mean(p.get(k, 0.0) for p in later), 2) for k in later[-1]
                       if k.startswith("time/")},
            "rss_at_start_mib": round(start_rss), "phase_rss_mib": {k: round(v) for k, v in timer.high.items()},
            "first_log_ratio_max": metrics.get("first_log_ratio_max"), "response_length": metrics["response_length"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--kl", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32, help="rl.micro_batch_size for both kinds")
    p.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing for both")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for kind in KINDS:
        argv = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--steps", str(args.steps),
                "--rank", str(args.rank), "--kl", str(args.kl), "--threads", str(args.threads),
                "--micro-batch", str(args.micro_batch)] + ["--gradient-checkpointing"] * args.gradient_checkpointing
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode != 0:  # e.g. -9: the kernel's OOM killer
            print(f"{kind}: the worker failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
            rows.append({"kind": kind, "exit": proc.returncode})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{kind:4s}: peak RSS {r['peak_rss_mib']:6.0f} MiB, {r['s_per_step']:5.1f} s/step (first "
              f"{r['first_step_s']:.1f} s), trainable {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.1f}M, "
              f"{r['dtype']}, first ratio max {r['first_log_ratio_max']:.1e}\n      phases {r['phases']}\n"
              f"      highest RSS per phase (MiB; {r['rss_at_start_mib']} before the steps) {r['phase_rss_mib']}",
              flush=True)
    full, lora = (next((r for r in rows if r["kind"] == k and "exit" not in r), None) for k in KINDS)
    if full and lora:
        print(f"LoRA r={args.rank} / full: peak RSS {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}x (goal <= 0.7), "
              f"time per step {lora['s_per_step'] / full['s_per_step']:.2f}x ({args.steps} steps each, kl_coef "
              f"{args.kl}, micro-batch {args.micro_batch}, "
              f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.threads} threads)")
    (REPO / "benchmarks" / ".last-lora.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
