"""One decode step's sampling over SmolLM2's 49,152-token vocabulary: before and after it moved into one buffer.

    python benchmarks/sampling.py [--rows 16,64] [--repeats 50]

In one process, interleaved A B A B: the former per-step code (softmax, `sample_tokens`' CDF, log_softmax and a
gather, and the finished rows' logits copied into a new (B, V) tensor: four fresh (B, V) tensors a step) against
`rollout/generate.py`'s `sample_with_logprobs` on a buffer reused across steps (exp(z - m), its sum and its CDF
written in place) and the logits updated in place. Prints the median ms per step and the ratio; the two draw the
same tokens from the same generator state (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from posttrain.rollout.generate import filter_logits, sample_tokens, sample_with_logprobs

V = 49152


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="16,64")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(2)
    print("| rows | former ms / step | one buffer ms / step | speed-up |")
    print("|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        raw = torch.randn(rows, V, generator=torch.Generator().manual_seed(0)) * 3
        every, step_out = torch.arange(rows), raw.clone()  # step_out: a decode step's new (rows, V) logits
        buffer = torch.empty_like(raw)

        def former(g):
            tok = sample_tokens(filter_logits(raw).softmax(-1), g)
            logp = F.log_softmax(raw, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            return tok, logp, raw.index_copy(0, every, step_out)

        def one_buffer(g):
            tok, logp = sample_with_logprobs(raw, g, buffer=buffer)
            return tok, logp, raw.index_copy_(0, every, step_out)

        a, b = former(torch.Generator().manual_seed(1)), one_buffer(torch.Generator().manual_seed(1))
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
        times = {former: [], one_buffer: []}
        g = torch.Generator().manual_seed(2)
        for _ in range(args.repeats):
            for fn in times:
                start = time.perf_counter()
                fn(g)
                times[fn].append(time.perf_counter() - start)
        old, new = (statistics.median(times[f]) * 1e3 for f in (former, one_buffer))
        print(f"| {rows} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
