"""Every RL preset from the same SFT checkpoint on the arithmetic task: held-out accuracy and seconds per step.

    posttrain sft configs/sft_arithmetic.yaml output_dir=runs/sft_seed0
    python benchmarks/presets_arithmetic.py --sft runs/sft_seed0/final [--steps 30] [--presets grpo,dapo]

Each preset runs `posttrain rl` with only `rl.preset`, the step count and the batch shape set, so the
table shows the presets' own settings at work. Group-based presets sample 32 prompts x 8; `ppo` and
`remax` (one sample per prompt in their papers) sample 256 prompts x 1, the same 256 responses per step.
Writes runs/presets/summary.json, a markdown table on stdout and runs/presets/presets.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from posttrain.config import load_config
from posttrain.train.metrics import read_metrics
from posttrain.presets import PRESETS
from posttrain.recipes.rl import run_rl

ONE_SAMPLE = {"ppo", "remax"}


def run(preset: str, sft: str, steps: int, out: Path, seed: int) -> dict:
    shape = ["rl.group_size=1", "rl.prompts_per_step=256"] if preset in ONE_SAMPLE else \
        ["rl.group_size=8", "rl.prompts_per_step=32"]
    cfg = load_config(None, [f"model.path={sft}", f"output_dir={out / preset}", f"rl.preset={preset}",
                             f"rl.steps={steps}", f"rl.eval_every={max(steps // 3, 1)}", f"seed={seed}",
                             "progress=false", *shape])
    start = time.perf_counter()
    summary = run_rl(cfg)
    lines = [m for m in read_metrics(out / preset / "metrics.jsonl") if m.get("phase") == "rl"]
    step_lines = [m for m in lines if "reward_mean" in m]
    seconds = sum(sum(v for k, v in m.items() if k.startswith("time/") and k != "time/eval") for m in step_lines)
    return {"preset": preset, "initial": summary["initial_accuracy"], "final": summary["rl_accuracy"],
            "curve": [(m["step"], m["accuracy"]) for m in lines if "accuracy" in m],
            "s_per_step": seconds / max(len(step_lines), 1), "wall_s": time.perf_counter() - start,
            "kl_last": step_lines[-1].get("kl") if step_lines else None}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps, acc = zip(*r["curve"])
        ax.plot(steps, acc, marker="o", label=r["preset"])
    ax.set_xlabel("RL step (256 responses each)")
    ax.set_ylabel("held-out accuracy (500 problems, greedy)")
    ax.set_title("RL presets from the same SFT checkpoint (arithmetic, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, help="SFT checkpoint directory (posttrain sft ... /final)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--out", default="runs/presets")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    results = [run(name, args.sft, args.steps, out, args.seed) for name in args.presets.split(",")]
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "presets.png")
    print("| preset | accuracy before | after | change | s/step | KL (last step) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        kl = "-" if r["kl_last"] is None else f"{r['kl_last']:.3f}"
        print(f"| {r['preset']} | {r['initial']:.3f} | {r['final']:.3f} | {r['final'] - r['initial']:+.3f} | "
              f"{r['s_per_step']:.2f} | {kl} |")


if __name__ == "__main__":
    main()
