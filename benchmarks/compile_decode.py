"""Does torch.compile pay for the decode step on CPU? One 64-row decode step of the issue's tiny Llama, eager
against `torch.compile` (inductor, static shapes), in one process (issue 8: "torch.compile where it pays").

    python benchmarks/compile_decode.py [--threads 2] [--new 64] [--repeats 5]

The step is the lean forward (LeanBackbone.forward, the code generation runs) over a cache made for static
shapes, so that one compilation serves every step: the KV cache is attended over its full capacity with the
unfilled positions masked, and this step's keys and values are written with `index_copy_` at a position given
as a tensor. Prints the time to the first three steps (the compilation), and the median milliseconds per step
of `--repeats` generations of `--new` tokens, for each.

Measured (2026-11-23, this 2-core AMD EPYC VM, torch 2.13.0+cpu, gcc present): eager 7.7-9.8 ms per step;
compiled 21-38 ms per step, after 15-28 s of compilation (2-2.4 s when inductor's on-disk cache is warm).
The profile of the compiled step shows its generated kernels taking 7.5-15 ms per step beside the same MKL
GEMMs eager makes: the in-place cache write into a graph input is functionalized into a copy of the whole
cache buffer, so compiling costs more than the ~15 small ops per layer it fuses save. Not used.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posttrain.models import build_char_tokenizer, build_tiny_model
from posttrain.models.lean import LeanDecoder, lean_backbone
from posttrain.models.logprobs import positions_from_mask
from posttrain.models.chat import encode_prompts
from rollout_throughput import MODEL, prompts


class StaticCache:
    """The decoder's KV cache written at a position given as a 0-dim tensor, attended over its whole capacity
    (unfilled positions are masked by the bias), so every step has the same shapes."""

    def __init__(self, cache, index: torch.Tensor) -> None:
        self.k, self.v, self.index = cache.k, cache.v, index.view(1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.index, k)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]


def static_step(lean, decoder: LeanDecoder):
    """(tokens (B,), positions (B,), write index 0-dim, bias (B, 1, 1, capacity)) -> (B, V) logits: the lean
    forward (LeanBackbone.forward, the same code generation runs) over a StaticCache."""

    def step(tokens, positions, index, bias):
        cos = decoder.cos_table[positions].view(-1, 1, 1, lean.D)
        sin = decoder.sin_table[positions].view(-1, 1, 1, lean.D)
        h = lean.forward(tokens.unsqueeze(1), cos, sin, bias, decoder.layers, StaticCache(decoder.cache, index))
        return lean.logits(h[:, -1])

    return step


@torch.no_grad()
def measure(fn, decoder: LeanDecoder, first: torch.Tensor, start: torch.Tensor, new: int, repeats: int):
    P = decoder.cache.length
    masked = torch.finfo(torch.float32).min

    def generation(steps: int) -> float:
        bias = decoder.bias.clone()
        bias[..., P:] = masked
        tokens = first.argmax(-1)
        t0 = time.perf_counter()
        for t in range(steps):
            bias[..., P + t] = 0
            logits = fn(tokens, start + t, torch.tensor(P + t), bias)
            tokens = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
        return time.perf_counter() - t0

    warm = generation(3)
    per_step = statistics.median(generation(new) / new for _ in range(repeats))
    return warm, per_step * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    model = build_tiny_model(MODEL, tok, seed=0).eval()
    ids, mask = encode_prompts(tok, prompts(args.batch))
    mask = mask.long()
    lean = lean_backbone(model)
    with torch.no_grad():
        decoder = LeanDecoder(lean, mask, args.new)
        first = decoder.prefill(ids, mask, positions_from_mask(mask))
    start = mask.sum(-1)
    step = static_step(lean, decoder)
    print(f"batch {args.batch}, {args.new} new tokens, {args.threads} threads, median of {args.repeats}")
    print("| decode step | first 3 steps (s) | ms per step |\n|---|---|---|")
    for name, fn in (("eager", step), ("torch.compile", torch.compile(step, dynamic=False))):
        warm, ms = measure(fn, decoder, first, start, args.new, args.repeats)
        print(f"| {name} | {warm:.2f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
