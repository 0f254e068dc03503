"""Plots of the offline alternatives to RL: best-of-n against n (`posttrain bon`).

Drawn on a bare ``matplotlib.figure.Figure`` and written with ``report.save_figure`` (atomic, no pyplot).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .report import save_figure


def plot_best_of_n(table: list[dict], out_png: str | Path, title: str | None = None, scorer: str = "task",
                   greedy: float | None = None) -> Path:
    """Two panels against n (log2 axis): (a) gold accuracy of the best-of-n completion and pass@n (and the
    greedy accuracy as a dotted line), (b) the scorer's mean score of the best-of-n completion.
    `table` rows: n, accuracy, score_mean, pass_at_k."""
    ns = [r["n"] for r in table]
    fig = Figure(figsize=(10, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.plot(ns, [r["accuracy"] for r in table], marker="o", color="tab:blue", label="best-of-n accuracy (gold)")
    a.plot(ns, [r["pass_at_k"] for r in table], marker="s", ls="--", color="tab:orange", label="pass@n")
    for n, acc in zip(ns, (r["accuracy"] for r in table), strict=True):
        a.annotate(f"{acc:.3f}", (n, acc), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    if greedy is not None:
        a.axhline(greedy, color="0.4", ls=":", lw=1.2, label=f"greedy ({greedy:.3f})")
    a.margins(y=0.1)
    a.set_title("(a) held-out accuracy", loc="left", fontsize=10)
    a.set_ylabel("accuracy")
    a.legend(fontsize=8, loc="lower right")
    b.plot(ns, [r["score_mean"] for r in table], marker="o", color="tab:green")
    b.set_title(f"(b) mean score of the kept completion (scorer: {scorer})", loc="left", fontsize=10)
    b.set_ylabel("score")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("n (samples per prompt)")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)
