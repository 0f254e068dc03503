"""Rollout tokens per second: posttrain's generate against Hugging Face `model.generate`, same model, same
prompts, sampling, in one process (issue 8's third row).

    python benchmarks/rollout_throughput.py [--repeats 5] [--threads 2]

Model: the issue's tiny Llama (hidden 128, 4 layers, 4 heads, intermediate 512, fp32), arithmetic prompts,
batch 64, 16 and 64 new tokens. Both generate exactly `new` tokens per row (posttrain: an EOS id no token
has; HF: no EOS and min_new_tokens = new), so both produce the same number of tokens. Prints the median of
`--repeats` runs of each and their ratio.

First measurement (2026-11-23, this 2-core machine, quiet, --repeats 3), before the lean decode loop: 16 new
tokens 8,485 vs 8,065 tok/s (1.05x), 64 new tokens 7,161 vs 7,348 tok/s (0.97x). Current numbers: `make bench`
(benchmarks/bench.py runs this comparison as its rollout rows) and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from posttrain.config import ModelConfig
from posttrain.models import build_char_tokenizer, build_tiny_model
from posttrain.models.chat import encode_prompts
from posttrain.rollout import generate

MODEL = ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512,
                    max_position_embeddings=128)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(n)]


def time_ours(model, ids, mask, new: int, pad: int) -> float:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    out = generate(model, ids, mask, max_new_tokens=new, eos_token_id=-1, pad_token_id=pad, temperature=1.0,
                   generator=g)
    elapsed = time.perf_counter() - start
    assert out.response_ids.shape == (ids.size(0), new)
    return elapsed


@torch.no_grad()
def time_hf(model, ids, mask, new: int, pad: int) -> float:
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=new, min_new_tokens=new, pad_token_id=pad, eos_token_id=None)
    elapsed = time.perf_counter() - start
    assert out.shape == (ids.size(0), ids.size(1) + new)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    model = build_tiny_model(MODEL, tok, seed=0).eval()
    n_params = sum(x.numel() for x in model.parameters())
    ids, mask = encode_prompts(tok, prompts(args.batch))
    print(f"tiny Llama {n_params / 1e6:.2f}M parameters, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| new tokens | posttrain tok/s | HF generate tok/s | ratio |\n|---|---|---|---|")
    for new in (16, 64):
        time_ours(model, ids, mask, new, tok.pad_token_id), time_hf(model, ids, mask, new, tok.pad_token_id)  # warm-up
        ours = statistics.median(time_ours(model, ids, mask, new, tok.pad_token_id) for _ in range(args.repeats))
        hf = statistics.median(time_hf(model, ids, mask, new, tok.pad_token_id) for _ in range(args.repeats))
        tokens = args.batch * new
        print(f"| {new} | {tokens / ours:,.0f} | {tokens / hf:,.0f} | {hf / ours:.2f}x |")


if __name__ == "__main__":
    main()
