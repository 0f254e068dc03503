"""The RLHF pipeline's comparison figure (rlhf.png): PPO with the KL penalty and ptx loss against the
same PPO without them (beta = 0, lambda_ptx = 0), on the learned reward and on the hidden gold score.

    (a) reward-model score of the sampled responses per step   (b) gold score of the same responses
    (c) KL(pi || pi_ref) per step (k1, summed per response)     (d) held-out greedy gold accuracy and
                                                                    reward-model score: SFT, PPO, ablation
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from posttrain.train.metrics import read_metrics
from posttrain.train.report import _legend, _plot_line, _series, save_figure

RUNS = (("ppo", "PPO (beta, ptx)", "tab:orange"), ("ablation", "PPO beta=0, ptx=0", "tab:red"))


def plot_rlhf(run_dir: str | Path, summary: dict, out_png: str | Path) -> Path:
    """Write `draw_rlhf`'s figure to `out_png` (atomically); returns its path."""
    return save_figure(draw_rlhf(run_dir, summary), out_png)


def draw_rlhf(run_dir: str | Path, summary: dict) -> Figure:
    """The four panels above from `run_dir`/{ppo,ablation}/metrics.jsonl and the pipeline's `summary`."""
    run_dir = Path(run_dir)
    fig = Figure(figsize=(10, 7), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    for sub, label, color in RUNS:
        path = run_dir / sub / "metrics.jsonl"
        if not path.exists():
            continue
        records = [r for r in read_metrics(path) if r.get("phase") == "rl"]
        for ax, key in ((a, "rm_score_mean"), (b, "gold_score"), (c, "kl")):
            x, y = _series(records, "rl", key)
            if len(y):
                _plot_line(ax, x, y, color, label, smooth=True)
    if "ablation" in summary:  # beta = 0 loads no reference, so the ablation logs no KL: its legend entry says so
        c.plot([], [], color="tab:red", label=f"{RUNS[1][1]}: no reference, no KL logged;\n"
               f"held-out KL {summary['ablation']['kl']:.1f} (PPO {summary['ppo_kl']:.2f})")
    for ax, title in ((a, "(a) reward-model score of samples (normalised)"), (b, "(b) gold score of samples"),
                      (c, "(c) KL to reference (per response)")):
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_xlabel("PPO step")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    names = ["SFT", "PPO"]
    gold = [summary["sft_accuracy"], summary["ppo_accuracy"]]
    rm = [summary["sft_rm_score"], summary["ppo_rm_score"]]
    if "ablation" in summary:
        names.append("PPO b=0,ptx=0")
        gold.append(summary["ablation"]["accuracy"])
        rm.append(summary["ablation"]["rm_score"])
    xs = range(len(names))
    d.bar([x - 0.2 for x in xs], gold, width=0.4, color="tab:green", label="gold accuracy")
    twin = d.twinx()
    twin.bar([x + 0.2 for x in xs], rm, width=0.4, color="tab:purple", label="RM score (normalised)")
    d.set_xticks(list(xs), names)
    d.set_ylim(0, 1)
    d.set_ylabel("gold accuracy", fontsize=8)
    twin.set_ylabel("reward-model score", fontsize=8)
    d.set_title("(d) held-out, greedy", loc="left", fontsize=10)
    _legend(d, d.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0])  # above the bars
    lo, hi = summary["improvement_ci95"]
    fig.suptitle(f"RLHF on {summary['eval_problems']} held-out problems: gold accuracy SFT -> PPO "
                 f"{summary['improvement']:+.3f} (95% CI {lo:+.3f}..{hi:+.3f})", fontsize=11)
    for ax in fig.axes:
        ax.tick_params(labelsize=8)
    return fig
