"""Padding in a real-model GRPO batch, and what the padding-free training forward saves (issue 23, item 2).

    python benchmarks/padding.py [--model models/smollm2-135m-instruct] [--prompts 8] [--group 4] [--new 256]

Samples `--group` responses to each of `--prompts` GSM8K questions (chat template, temperature 1, up to `--new`
tokens) with SmolLM2-135M-Instruct, then reports the share of padding among the positions the position-wise work
(norms, projections, MLP) runs on, in three layouts:
  padded      every row as prompt + response padded to the batch's longest (what a plain HF forward computes)
  micro       posttrain without padding-free: micro-batches of 8 rows grouped by length, all-padding columns
              trimmed, each distinct prompt run once (posttrain.batch.micro_rows / trimmed, LeanBackbone)
  packed      padding-free: only real tokens (attention alone still sees the padded layout)
and times the reference pass (no grad) and one update pass (forward + backward) over the batch in micro-batches
of 8, padding-free against padded, interleaved A B A B in one process (ratios are what carry across machines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from posttrain.batch import RolloutBatch, map_micro_batches, micro_rows, trimmed
from posttrain.models import lean as lean_module
from posttrain.models.lean import distinct_rows
from posttrain.models.logprobs import response_logprobs
from posttrain.rollout import generate

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MICRO = 8


def sample(model, tok, prompts: int, group: int, new: int) -> RolloutBatch:
    rows = [json.loads(line) for line in GSM8K.open()][:prompts]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows for _ in range(group)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        return generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=new, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))


def padding_shares(batch: RolloutBatch) -> dict:
    real = int(batch.prompt_mask.sum() + batch.response_mask.sum())
    B, P = batch.prompt_mask.shape
    padded = B * (P + batch.response_mask.size(1))
    micro = 0
    for rows in micro_rows(batch.response_mask, MICRO):
        m = trimmed(batch.select(rows))
        _, first = distinct_rows(m.prompt_ids, m.prompt_mask)
        micro += len(first) * m.prompt_mask.size(1) + m.response_mask.numel()
    # real tokens once per distinct prompt, as the micro layout and the packed layout both count them
    real_shared = 0
    for rows in micro_rows(batch.response_mask, MICRO):
        m = batch.select(rows)
        _, first = distinct_rows(m.prompt_ids, m.prompt_mask)
        real_shared += int(m.prompt_mask[first].sum() + m.response_mask.sum())
    return {"real_tokens": real, "padded": round(1 - real / padded, 3), "micro": round(1 - real_shared / micro, 3),
            "packed": 0.0, "positions_padded": padded, "positions_micro": micro, "positions_packed": real_shared}


def timed(fn, runs: int) -> dict:
    times = {"padding-free": [], "padded": []}
    for _ in range(runs + 1):  # the first round warms up
        for name, below in (("padding-free", lean_module.PADDING_FREE_BELOW), ("padded", 0.0)):
            saved, lean_module.PADDING_FREE_BELOW = lean_module.PADDING_FREE_BELOW, below
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            lean_module.PADDING_FREE_BELOW = saved
    return {k: round(statistics.median(v[1:]), 3) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    start = time.perf_counter()
    batch = sample(model, tok, args.prompts, args.group, args.new)
    print(f"sampled {len(batch)} rows in {time.perf_counter() - start:.1f} s; response lengths "
          f"{batch.response_lengths.min().item()}-{batch.response_lengths.max().item()}, prompt lengths "
          f"{batch.prompt_mask.sum(1).min().item()}-{batch.prompt_mask.sum(1).max().item()}")
    print("padding share of the position-wise work:", json.dumps(padding_shares(batch)))

    def reference():
        with torch.no_grad():
            map_micro_batches(batch, MICRO, lambda m: response_logprobs(model, m.prompt_ids, m.prompt_mask,
                                                                        m.response_ids, m.response_mask)[0])

    def update():
        model.zero_grad(set_to_none=True)
        for rows in micro_rows(batch.response_mask, MICRO):
            m = trimmed(batch.select(rows))
            logprobs, _ = response_logprobs(model, m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask,
                                            with_entropy=True)
            (logprobs.sum() / batch.response_mask.sum()).backward()

    for name, fn in (("reference (no grad)", reference), ("update (forward + backward)", update)):
        t = timed(fn, args.runs)
        print(f"{name}: padding-free {t['padding-free']} s, padded {t['padded']} s, "
              f"{t['padded'] / t['padding-free']:.2f}x")


if __name__ == "__main__":
    main()
