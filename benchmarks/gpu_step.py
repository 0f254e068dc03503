"""GRPO steps on a GPU (issue 23, item 7): posttrain's step on random weights of the tiny Llama's and SmolLM2-135M's
shapes, with tokens/s, step time, per-phase times and model FLOP utilisation. One prepared script, sized for one
10-minute run on a lent GPU machine (the GGUF is larger than a call can carry there, so the weights are random;
everything it reads is in this repository).

    python benchmarks/gpu_step.py [--device cuda] [--dtype bfloat16] [--models tiny,smollm2] [--steps 3]
                                  [--new 128] [--peak-tflops 989] [--out DIR]

Rows (each: one warm-up step, then --steps measured steps of `RLRun.step`, the loop every backend runs):
  tiny     the bench's tiny Llama (hidden 128, 4 layers, vocabulary 100), arithmetic prompts, 8 prompts x 8
           samples, <= 8 new tokens (benchmarks/setups.py's settings).
  smollm2  SmolLM2-135M-Instruct's shape (hidden 576, 30 layers, 9 query / 3 key-value heads, intermediate 1536,
           vocabulary 49,152, tied head) with its real tokenizer and chat template (tests/data/smollm2_tokenizer),
           GSM8K prompts (benchmarks/data/gsm8k_64.jsonl), 8 prompts x 4 samples, <= --new tokens, k3 KL 0.04.
           Random weights rarely write the end-of-turn token, so responses run to --new: every step does the
           same work (a trained model's stop early; the finished rows then leave the batch).
Model FLOPs count 2 N per token of every forward (generation, prompt included; reference) and 6 N for the update,
N = the decoder layers' matmul weights, plus the head's 2 / 2 / 6 V C per response token only (generation samples
from the last position; the training passes take log-probs of the response), no attention FLOPs, no credit for
the prompt shared by a group (a GPU engine may share it; posttrain's generation does): MFU = those FLOPs over
step time over --peak-tflops (H200 bf16 dense: 989). Phases end with a CUDA synchronize (train/optim.PhaseTimer).
TRL's step is not run by this script (its GRPOTrainer would need the same set-up on the device: see RESULTS.md).
Prints a table and writes gpu_step.json to --out (default: $OUT when set, else the current directory).

On a CPU (--device cpu --dtype float32 --models tiny --steps 1) the same code runs, which is how it was checked
before a GPU run; the MFU column is then against the given peak, not this CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu"}
TOKENIZER = REPO / "tests" / "data" / "smollm2_tokenizer"
GSM8K = REPO / "benchmarks" / "data" / "gsm8k_64.jsonl"


def smollm2_dir(out: Path) -> Path:
    """A random-weight model of SmolLM2-135M's shape with its real tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(**SMOLLM2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def config(name: str, out: Path, args):
    from posttrain.config import build_config

    rl = {"preset": "grpo", "steps": 100, "lr": 1e-6, "warmup_steps": 0, "kl_coef": 0.04, "kl_estimator": "k3",
          "temperature": 1.0, "mini_batches": 1, "eval_every": 0}
    run = {"seed": 0, "output_dir": str(out / name), "progress": False}
    model = {"device": args.device, "dtype": args.dtype}
    if name == "tiny":
        from benchmarks import setups

        model.update(setups.MODEL)
        rl.update(prompts_per_step=8, group_size=8, max_new_tokens=8, micro_batch_size=64)
        return build_config({**run, "model": model, "task": {"num_eval": 8, "min_operand": 10}, "rl": rl}, [])
    model["path"] = str(smollm2_dir(out / "smollm2-random"))
    rl.update(prompts_per_step=8, group_size=4, max_new_tokens=args.new, micro_batch_size=8)
    return build_config({**run, "model": model, "task": {"name": "gsm8k", "path": str(GSM8K), "num_eval": 8},
                         "rl": rl}, [])


def matmul_params(model) -> tuple[int, int]:
    """(body, head): the decoder layers' matmul weights, and the LM head's (V x C, also when tied to the
    embedding table, which itself does no matmul)."""
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in name and p.data_ptr() != head.data_ptr())
    return body, head.numel()


def bench(name: str, out: Path, args) -> dict:
    from posttrain.models import load_policy
    from posttrain.models.precision import precision
    from posttrain.rl.loop import RLRun
    from posttrain.tasks import build_task, fit_task
    from posttrain.train.optim import PhaseTimer

    cfg = config(name, out, args)
    model, tok = load_policy(cfg.model, seed=cfg.seed)
    task = build_task(cfg.task, cfg.seed)
    fit_task(task, cfg, model, tok, cfg.rl.prompts_per_step)
    run = RLRun.local(cfg, model, tok, task)
    timer = PhaseTimer()
    body, head = matmul_params(model)
    steps = []
    for i in range(1 + args.steps):
        start = time.perf_counter()
        with precision(cfg.model):
            metrics = run.step(timer)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        phases = {k.removeprefix("time/"): v for k, v in timer.pop().items()}
        length = float(metrics.get("response_length", float("nan")))
        if i:  # the first is the warm-up (CUDA context, kernels, allocator)
            steps.append({"seconds": seconds, "phases": phases, "response_length": length})
        print(f"  {name} step {i}{' (warm-up)' if not i else ''}: {seconds:.3f} s, "
              f"{ {k: round(v, 3) for k, v in phases.items()} }", flush=True)
    B = cfg.rl.prompts_per_step * cfg.rl.group_size
    seconds = statistics.median(s["seconds"] for s in steps)
    gen_s = statistics.median(s["phases"].get("generate", float("nan")) for s in steps)
    resp = statistics.mean(s["response_length"] for s in steps)
    if resp != resp:  # the metric's name differs: count from the configured maximum
        resp = float(cfg.rl.max_new_tokens)
    problems = task.sample_prompts(random.Random(0), B)
    prompt = statistics.mean(len(tok(getattr(q, "prompt", q), add_special_tokens=False).input_ids) for q in problems)
    tokens = B * (prompt + resp)
    # generation (2 per weight per token), reference (2), update (6); the head only where log-probs are taken
    flops = (2 + 2 + 6) * body * tokens + 2 * head * B * resp + (2 + 6) * head * B * resp
    return {"model": name, "device": args.device, "dtype": args.dtype, "matmul_params": body + head, "sequences": B,
            "mean_prompt_tokens": prompt, "mean_response_tokens": resp, "step_seconds": seconds,
            "generate_seconds": gen_s, "generated_tokens_per_s": B * resp / gen_s,
            "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (args.peak_tflops * 1e12), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new", type=int, default=128, help="SmolLM2 row: new tokens per response")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak for --dtype")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_step.py: no CUDA device here (use --device cpu to check the script on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{device}, torch {torch.__version__}, {args.dtype}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="posttrain-gpu-") as tmp:
        for name in args.models.split(","):
            rows.append(bench(name, Path(tmp), args))
    print("| model | sequences x tokens (prompt + response) | step s | generate s | generated tok/s | "
          "model TFLOP/step | achieved TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sequences']} x ({r['mean_prompt_tokens']:.0f} + {r['mean_response_tokens']:.0f})"
              f" | {r['step_seconds']:.3f} | {r['generate_seconds']:.3f} | {r['generated_tokens_per_s']:,.0f} | "
              f"{r['model_tflops_per_step']:.3f} | {r['achieved_tflops']:.2f} | {r['mfu']:.2%} |")
    (out / "gpu_step.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
