"""Plots of the offline alternatives to RL: best-of-n against n (`posttrain bon`).

Drawn on a bare ``matplotlib.figure.Figure`` and written with ``report.save_figure`` (atomic, no pyplot).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .report import save_figure


def plot_best_of_n(table: list[dict], out_png: str | Path, title: str | None = None, scorer: str = "task",
                   greedy: float | None = None) -> Path:
    """Write `draw_best_of_n`'s figure to `out_png` (atomically); returns its path."""
    return save_figure(draw_best_of_n(table, title, scorer, greedy), out_png)


def draw_best_of_n(table: list[dict], title: str | None = None, scorer: str = "task",
                   greedy: float | None = None) -> Figure:
    """Two panels against n (log2 axis): (a) gold accuracy of the best-of-n completion and pass@n (and the
    greedy accuracy as a dotted line; when the two coincide, as with the verifier as scorer, pass@n is drawn
    wide beneath best-of-n and its legend entry says so), (b) the scorer's mean score of the best-of-n completion.
    `table` rows: n, accuracy, score_mean, pass_at_k."""
    ns = [r["n"] for r in table]
    fig = Figure(figsize=(10, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    acc, passed = [r["accuracy"] for r in table], [r["pass_at_k"] for r in table]
    same = all(abs(x - y) < 1e-9 for x, y in zip(acc, passed, strict=True))
    # pass@n first, wide and hollow, so best-of-n drawn on top stays visible and pass@n shows around it
    a.plot(ns, passed, marker="s", ms=10, mfc="none", mew=1.5, ls="-", lw=5, alpha=0.45, color="tab:orange",
           label="pass@n" + (" (equal to best-of-n at every n)" if same else ""))
    a.plot(ns, acc, marker="o", ms=5, ls="--", lw=1.4, color="tab:blue", label="best-of-n accuracy (gold)")
    for n, value in zip(ns, acc, strict=True):
        a.annotate(f"{value:.3f}", (n, value), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    if greedy is not None:
        a.axhline(greedy, color="0.4", ls=":", lw=1.2, label=f"greedy ({greedy:.3f})")
    a.margins(y=0.1)
    a.set_title("(a) held-out accuracy", loc="left", fontsize=10)
    a.set_ylabel("accuracy")
    a.legend(fontsize=8, loc="best")
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
    return fig


def plot_examples(rows: list[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Held-out prompts with the responses before and after training, side by side (`demo --pipeline real`).
    rows: {"request", "instruction", "before", "after", "before_ok", "after_ok"}."""
    return save_figure(draw_examples(rows, title), out_png)


def draw_examples(rows: list[dict], title: str | None = None, width: int = 52, lines: int = 9) -> Figure:
    """One row of two text panels per example: the response before (left) and after (right), each headed by
    the request, the constraint and whether the checker accepted it (green) or not (red)."""
    import textwrap

    fig = Figure(figsize=(12, 2.6 * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False)
    for (left, right), row in zip(axes, rows):
        for ax, key in ((left, "before"), (right, "after")):
            ok = row[f"{key}_ok"]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("tab:green" if ok else "tab:red")
                spine.set_linewidth(2)
            wrapped = textwrap.wrap(row[key].replace("\n", " / ") or "(empty)", width)
            text = "\n".join(wrapped[:lines]) + ("\n..." if len(wrapped) > lines else "")
            head = f"{key}: {'follows' if ok else 'does not follow'} {row['instruction']}"
            ax.set_title(head, loc="left", fontsize=8, color="tab:green" if ok else "tab:red")
            ax.text(0.01, 0.97, text, va="top", ha="left", fontsize=7.5, family="monospace", transform=ax.transAxes)
        left.set_ylabel(textwrap.fill(row["request"], 24), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
