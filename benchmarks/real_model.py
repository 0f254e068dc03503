"""SmolLM2-135M-Instruct on this CPU (issue 17): posttrain against transformers' `model.generate` and TRL 1.16,
on identical work, interleaved A B A B in one process so machine load hits both alike.

    python benchmarks/real_model.py [--model models/smollm2-135m-instruct] [--runs 3] [--only decode,grpo,rss]
                                    [--task ifeval|gsm8k] [--new 128] [--batches 16,64] [--dtypes fp32,bf16]

Rows:
  decode   rollout tokens/s, batch 16 and 64 GSM8K questions rendered with the chat template, sampling at
           temperature 1, up to 128 new tokens, stopping at <|im_end|>: posttrain `generate` vs `model.generate`.
           Tokens are the generated ones up to and including each row's end-of-turn (padding after it is not
           counted on either side). float32 on both sides, then both inside bf16 autocast.
  grpo     one GRPO step, 8 prompts x 4 samples, <= --new tokens, --task (ifeval; gsm8k: ../shared/data's
           GSM8K train, `make bench`: 256 new tokens), k3 KL (beta 0.04) to a
           reference, one optimizer step: posttrain `RLRun.step` vs TRL's GRPOTrainer step, float32 on both sides
           (TRL's CPU path has no bf16 autocast for generation); posttrain's per-phase times; and posttrain's
           step with model.dtype=bfloat16 on its own.
  rss      peak RSS (VmHWM) of a process running 2 such steps, posttrain and TRL each in its own process (run it
           alone, --only rss: the parent of a decode/grpo run still holds its models while the workers run).
Prints a table; `make real-model` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
THREADS = 2


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def chat_batch(tok, n: int):
    rows = [json.loads(line) for line in GSM8K.open()][:n]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------- decode
def decode_row(model, tok, batch: int, new: int, runs: int, low: bool) -> dict:
    from posttrain.rollout import generate

    ids, mask = chat_batch(tok, batch)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ctx = bf16 if low else nullcontext

    def ours(seed):
        with ctx(), torch.no_grad():
            start = time.perf_counter()
            out = generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                           generator=torch.Generator().manual_seed(seed))
            return int(out.response_mask.sum()), time.perf_counter() - start

    def theirs(seed):
        torch.manual_seed(seed)
        with ctx(), torch.no_grad():
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new, eos_token_id=eos, pad_token_id=tok.pad_token_id)
            elapsed = time.perf_counter() - start
        resp = out[:, ids.size(1):]
        done = (resp == eos).int().cumsum(1)
        tokens = int(((done == 0) | ((done == 1) & (resp == eos))).sum())  # up to and including the first eos
        return tokens, elapsed

    ours(0), theirs(0)  # warm-up
    a, b = [], []
    for r in range(runs):
        a.append(ours(r + 1))
        b.append(theirs(r + 1))
    rate = lambda xs: statistics.median(t / s for t, s in xs)  # noqa: E731
    return {"batch": batch, "dtype": "bf16" if low else "fp32", "posttrain_tok_s": rate(a), "hf_tok_s": rate(b),
            "ratio": rate(a) / rate(b), "posttrain_tokens": statistics.mean(t for t, _ in a),
            "hf_tokens": statistics.mean(t for t, _ in b)}


# ---------------------------------------------------------------- GRPO step
TASKS = {"ifeval": {"name": "ifeval", "num_eval": 8},
         "gsm8k": {"name": "gsm8k", "path": str(GSM8K), "num_eval": 8}}


def run_config(model_path, out, dtype="float32", task="ifeval", new=128):
    from posttrain.config import build_config

    return build_config({"output_dir": str(out), "threads": THREADS, "progress": False,
                         "model": {"path": str(model_path), "dtype": dtype}, "task": TASKS[task],
                         "rl": {"preset": "grpo", "steps": 100, "prompts_per_step": 8, "group_size": 4, "lr": 1e-6,
                                "warmup_steps": 0, "kl_coef": 0.04, "kl_estimator": "k3", "max_new_tokens": new,
                                "temperature": 1.0, "mini_batches": 1, "micro_batch_size": 8}}, [])


def posttrain_step(cfg, model, tok):
    from posttrain.rl.loop import RLRun
    from posttrain.tasks import build_task, fit_task
    from posttrain.train.optim import PhaseTimer

    task = build_task(cfg.task, cfg.seed)
    fit_task(task, cfg, model, tok, cfg.rl.prompts_per_step)
    run = RLRun.local(cfg, model, tok, task)
    timer = PhaseTimer()

    def step() -> dict:
        from posttrain.models.precision import precision

        with precision(cfg.model):
            metrics = run.step(timer)
        metrics.update(timer.pop())
        return metrics

    return step, task


def trl_trainer(cfg, model_path, task, out, steps, clock, micro: int = 0, bf16: bool = False):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    c = cfg.rl
    probs = task.train_problems  # prompts already rendered with the chat template by fit_task
    data = Dataset.from_dict({"prompt": [p.prompt for p in probs], "idx": list(range(len(probs)))})

    def reward(prompts, completions, idx, **_):  # the task's own verifiable reward, as posttrain scores it
        return [float(r) for r in task.reward(prompts, completions, [probs[i] for i in idx])]

    # micro (--trl-micro-batch): TRL's forward in micro-batches of that many sequences (gradient accumulation; still
    # one generation and one optimizer step per GRPO step); 0: the step's 32 sequences in one forward, TRL's fastest
    # here where it fits (16.9 GB at <= 128 new tokens; at 256 it was killed for memory on this 24 GB machine)
    micro = micro or c.prompts_per_step * c.group_size
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=micro,
        gradient_accumulation_steps=c.prompts_per_step * c.group_size // micro,
        num_generations=c.group_size, max_completion_length=c.max_new_tokens, learning_rate=c.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=c.grad_clip, beta=c.kl_coef, epsilon=c.clip_eps_low, loss_type="dapo", scale_rewards="group",
        temperature=1.0, top_k=0, top_p=1.0, num_iterations=1, max_steps=steps, seed=0, use_cpu=True, bf16=bf16,
        gradient_checkpointing=False, save_strategy="no", report_to=[], logging_strategy="no", log_level="error",
        disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    return GRPOTrainer(model=str(model_path), reward_funcs=reward, args=args, train_dataset=data,
                       processing_class=tok, callbacks=[clock.callback])


def grpo_row(model_path, runs: int, warmup: int = 1, task_name: str = "ifeval", new: int = 128,
             trl_micro: int = 0, trl_bf16: bool = False) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from setups import StepClock

    tmp = Path(tempfile.mkdtemp())
    cfg = run_config(model_path, tmp, task=task_name, new=new)
    model, tok = load(model_path)
    step, task = posttrain_step(cfg, model, tok)
    ours, phases = [], []

    def between(_model, _k):
        start = time.perf_counter()
        phases.append(step())
        ours.append(time.perf_counter() - start)
        return False

    clock = StepClock(between)
    trl_trainer(cfg, model_path, task, tmp / "trl", warmup + runs, clock, trl_micro).train()
    low_model, _ = load(model_path)
    low_cfg = run_config(model_path, tmp / "bf16", "bfloat16", task_name, new)
    low_step, _ = posttrain_step(low_cfg, low_model, tok)
    low, low_phases = [], []

    def between_low(_model=None, _k=None):
        start = time.perf_counter()
        low_phases.append(low_step())
        low.append(time.perf_counter() - start)
        return False

    low_clock = StepClock(between_low)
    if trl_bf16:  # TRL with bf16=True (accelerate's CPU autocast), interleaved with posttrain's bf16 steps
        trl_trainer(low_cfg, model_path, task, tmp / "trl-bf16", warmup + runs, low_clock, trl_micro, bf16=True).train()
    else:
        for _ in range(warmup + runs):
            between_low()
    phase = lambda ps: {k[5:]: round(statistics.mean(p[k] for p in ps[warmup:]), 2)  # noqa: E731
                        for k in ps[-1] if k.startswith("time/")}
    return {"posttrain_s": statistics.median(ours[warmup:]), "trl_s": statistics.median(clock.steps[warmup:]),
            "posttrain_bf16_s": statistics.median(low[warmup:]), "phases_fp32": phase(phases),
            "trl_bf16_s": statistics.median(low_clock.steps[warmup:]) if trl_bf16 else None,
            "phases_bf16": phase(low_phases),
            "response_length": statistics.mean(p["response_length"] for p in phases[warmup:])}


def rss_worker(kind: str, model_path, task: str = "ifeval", new: int = 128, trl_micro: int = 0) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from setups import StepClock

    tmp = Path(tempfile.mkdtemp())
    cfg = run_config(model_path, tmp, "bfloat16" if kind == "posttrain-bf16" else "float32", task, new)
    model, tok = load(model_path)
    if kind.startswith("posttrain"):
        step, _ = posttrain_step(cfg, model, tok)
        step(), step()
    else:
        from posttrain.tasks import build_task, fit_task

        task = build_task(cfg.task, cfg.seed)
        fit_task(task, cfg, model, tok, cfg.rl.prompts_per_step)
        del model
        trl_trainer(cfg, model_path, task, tmp / "trl", 2, StepClock(), trl_micro).train()
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {"kind": kind, "peak_rss_mib": int(hwm.split()[1]) / 1024}


def rss_row(model_path, task: str = "ifeval", new: int = 128, trl_micro: int = 0) -> list[dict]:
    out = []
    for kind in ("posttrain", "posttrain-bf16", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(model_path), "--task", task,
                               "--new", str(new), "--trl-micro-batch", str(trl_micro)], capture_output=True,
                              text=True)
        if proc.returncode != 0:  # e.g. -9: the kernel's OOM killer (the step needs more than the machine has)
            out.append({"kind": kind, "peak_rss_mib": None, "exit": proc.returncode})
            continue
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="decode,grpo,rss")
    p.add_argument("--task", default="ifeval", choices=sorted(TASKS), help="the GRPO and RSS rows' prompts")
    p.add_argument("--new", type=int, default=128, help="the GRPO and RSS rows' max new tokens")
    p.add_argument("--batches", default="16,64", help="the decode rows' batch sizes")
    p.add_argument("--dtypes", default="fp32,bf16", help="the decode rows' precisions")
    p.add_argument("--trl-micro-batch", type=int, default=0, help="TRL's forward in micro-batches of this many "
                   "sequences (gradient accumulation); 0: all of a step's sequences in one forward")
    p.add_argument("--trl-bf16", action="store_true", help="the GRPO row's bf16 steps against TRL with bf16=True "
                   "(interleaved), not alone")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    if args.worker:
        print(json.dumps(rss_worker(args.worker, args.model, args.task, args.new, args.trl_micro_batch)))
        return
    parts = args.only.split(",")
    results = {}
    if "decode" in parts:
        model, tok = load(args.model)
        results["decode"] = [decode_row(model, tok, int(b), 128, args.runs, d == "bf16")
                             for d in args.dtypes.split(",") for b in args.batches.split(",")]
        for r in results["decode"]:
            print(f"decode batch {r['batch']:2d} {r['dtype']}: posttrain {r['posttrain_tok_s']:6.1f} tok/s, "
                  f"model.generate {r['hf_tok_s']:6.1f} tok/s, {r['ratio']:.2f}x "
                  f"(tokens per run {r['posttrain_tokens']:.0f} vs {r['hf_tokens']:.0f})", flush=True)
    if "grpo" in parts:
        g = results["grpo"] = grpo_row(args.model, args.runs, task_name=args.task, new=args.new,
                                         trl_micro=args.trl_micro_batch, trl_bf16=args.trl_bf16)
        print(f"GRPO step fp32: posttrain {g['posttrain_s']:.1f} s, TRL {g['trl_s']:.1f} s, "
              f"{g['trl_s'] / g['posttrain_s']:.2f}x; posttrain bf16 {g['posttrain_bf16_s']:.1f} s "
              f"({g['trl_s'] / g['posttrain_bf16_s']:.2f}x TRL fp32)\n  phases fp32 {g['phases_fp32']}\n  phases bf16 "
              f"{g['phases_bf16']}", flush=True)
        if g["trl_bf16_s"] is not None:
            print(f"GRPO step bf16: posttrain {g['posttrain_bf16_s']:.1f} s, TRL bf16=True {g['trl_bf16_s']:.1f} s, "
                  f"{g['trl_bf16_s'] / g['posttrain_bf16_s']:.2f}x", flush=True)
    if "rss" in parts:
        results["rss"] = rss_row(args.model, args.task, args.new, args.trl_micro_batch)
        print("peak RSS: " + ", ".join(f"{r['kind']} {r['peak_rss_mib']:.0f} MiB" if r["peak_rss_mib"] is not None
                                       else f"{r['kind']} died (exit {r['exit']})" for r in results["rss"]))
    (REPO / "benchmarks" / ".last-real-model.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
