"""Prompt-lookup speculative sampling (posttrain/rollout/speculative.py) against plain `generate`, on identical work,
interleaved A B A B in one process so machine load hits both alike (issue 23, item 4).

    python benchmarks/speculative.py [--setups demo,smollm2] [--runs 3] [--k 4] [--n 3] [--batch 16] [--new 128]

Setups:
  demo     the arithmetic demo's SFT checkpoint (`posttrain demo` writes OUTPUT_DIR/sft; --demo PATH, else the
           first of runs/demo/sft and /tmp/demo_final/sft that exists), GRPO's rollout batch: 8 training problems
           x 8 samples, rl.max_new_tokens (6) new tokens, character tokenizer.
  smollm2  SmolLM2-135M-Instruct (--model), --batch GSM8K questions with the chat template, --new new tokens,
           stopping at <|im_end|>, float32.
Each setup runs sampling at temperature 1 and greedy decoding. Reported per row: tokens/s of both (median over
runs; tokens are the generated ones under the response mask), the ratio (speculative / plain; > 1 is faster),
and the speculative counts: draft tokens accepted per verify pass of a row (`acc/pass`), tokens emitted per pass
of a row (`tok/pass`, 1 + acc/pass but for rows that stop early), and the share of drafted tokens accepted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

import torch

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def demo_setup(path: Path | None):
    import random

    from posttrain.config import ModelConfig, TaskConfig
    from posttrain.models.chat import encode_prompts
    from posttrain.models.loading import load_policy
    from posttrain.tasks import build_task

    candidates = [path] if path else [REPO / "runs" / "demo" / "sft", Path("/tmp/demo_final/sft")]
    found = next((p for p in candidates if p is not None and (p / "config.json").exists()), None)
    if found is None:
        raise SystemExit(f"no demo SFT checkpoint at {', '.join(map(str, candidates))}: run `posttrain demo` "
                         "(or pass --demo PATH)")
    model, tok = load_policy(ModelConfig(path=str(found)))
    model.eval()
    task = build_task(TaskConfig(), 0)
    problems = task.sample_prompts(random.Random(0), 8)
    ids, mask = encode_prompts(tok, [p.prompt for p in problems for _ in range(8)])
    return str(found), model, ids, mask, tok.eos_token_id, tok.pad_token_id, 6


def smollm2_setup(path: Path, batch: int, new: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in GSM8K.open()][:batch]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return str(path), model, enc.input_ids, enc.attention_mask, tok.convert_tokens_to_ids("<|im_end|>"), \
        tok.pad_token_id, new


def compare(model, ids, mask, eos, pad, new, greedy, runs, k, n) -> dict:
    from posttrain.rollout import generate
    from posttrain.rollout.speculative import speculative_generate

    kw = {"max_new_tokens": new, "eos_token_id": eos, "pad_token_id": pad, "greedy": greedy}

    def plain(seed):
        start = time.perf_counter()
        out = generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)
        return int(out.response_mask.sum()), time.perf_counter() - start, None

    def spec(seed):
        stats: dict = {}
        start = time.perf_counter()
        out = speculative_generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), draft_tokens=k,
                                   ngram=n, stats=stats, **kw)
        return int(out.response_mask.sum()), time.perf_counter() - start, stats

    plain(0), spec(0)  # warm-up
    a, b = [], []
    for r in range(runs):
        a.append(plain(r + 1))
        b.append(spec(r + 1))
    rate = lambda xs: statistics.median(t / s for t, s, _ in xs)
    total = {key: sum(s[key] for _, _, s in b) for key in b[0][2]}
    return {"mode": "greedy" if greedy else "T=1", "plain_tok_s": rate(a), "spec_tok_s": rate(b),
            "ratio": rate(b) / rate(a),
            "pair_ratios": [round((tb / sb) / (ta / sa), 3) for (ta, sa, _), (tb, sb, _) in zip(a, b)],
            "acc_per_pass": total["accepted"] / total["row_passes"], "tok_per_pass": (total["tokens"] - total["rows"]) / total["row_passes"],
            "accept_share": total["accepted"] / max(total["drafted"], 1), "passes": total["passes"] / runs,
            "plain_tokens": statistics.mean(t for t, _, _ in a), "spec_tokens": statistics.mean(t for t, _, _ in b)}


def pass_costs(model, ids, mask, k: int, reps: int = 5) -> dict:
    """Milliseconds (best of `reps`) of one LeanDecoder decode step and of one verify pass over L tokens per row
    (every position used), at the setup's batch, after the prefill."""
    from posttrain.models.lean import LeanDecoder, lean_backbone, positions_from_mask
    from posttrain.rollout.speculative import _LeanVerifier

    lean = lean_backbone(model)
    R = ids.size(0)

    def best(f) -> float:
        f()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    with torch.no_grad():
        dec = LeanDecoder(lean, mask, 64)
        dec.prefill(ids, mask, positions_from_mask(mask))
        pos, tok = mask.sum(-1), torch.zeros(R, dtype=torch.long)

        def step():
            dec.step(tok, pos)
            dec.cache.length -= 1

        ver = _LeanVerifier(lean, ids, mask, 64, k)
        fed = torch.zeros(R, dtype=torch.long)
        out = {"step": best(step)}
        for L in (1, 2, k + 1):
            z = torch.zeros(R, L, dtype=torch.long)
            out[f"verify L={L}"] = best(lambda z=z: ver.verify(z, fed, torch.ones_like(z, dtype=torch.bool)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="demo,smollm2")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    ap.add_argument("--demo", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per verify pass")
    ap.add_argument("--n", default="3", help="matched suffix length(s), comma-separated: one row each")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded 2-core machine a second "
                    "thread only waits; measured 25x slower at load 12)")
    ap.add_argument("--modes", default="sample,greedy", help="sample and/or greedy; '' for none (with --costs)")
    ap.add_argument("--costs", action="store_true", help="also time one decode step against verify passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} threads={args.threads} k={args.k} runs={args.runs}")
    for name in args.setups.split(","):
        where, model, ids, mask, eos, pad, new = (demo_setup(args.demo) if name == "demo"
                                                  else smollm2_setup(args.model, args.batch, args.new))
        print(f"## {name}: {where}, batch {ids.size(0)} x prompt {ids.size(1)}, <= {new} new tokens")
        if args.costs:
            costs = pass_costs(model, ids, mask, args.k)
            print("pass cost (ms, best of 5): " + ", ".join(f"{key} {ms:.1f} ({ms / costs['step']:.2f}x)"
                                                           for key, ms in costs.items()))
        print("| mode | n | plain tok/s | spec tok/s | ratio | per-run ratios | acc/pass | tok/pass | accepted share |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in filter(None, args.modes.split(",")):
            for n in map(int, args.n.split(",")):
                r = compare(model, ids, mask, eos, pad, new, mode == "greedy", args.runs, args.k, n)
                print(f"| {r['mode']} | {n} | {r['plain_tok_s']:.0f} | {r['spec_tok_s']:.0f} | {r['ratio']:.2f} | "
                      f"{r['pair_ratios']} | {r['acc_per_pass']:.2f} | {r['tok_per_pass']:.2f} | "
                      f"{r['accept_share']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
