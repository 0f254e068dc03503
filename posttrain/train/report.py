"""A one-page PNG report of a run, drawn from its metrics.jsonl.

Records carry ``step`` (counted per phase) and ``phase`` ("sft", "rl", "rm", "dpo", "rft", ...) plus the
metrics of docs/metrics.md. The page holds only panels with data: for each phase, in the order the phases
first appear, each entry of ``PANELS`` of which that phase logged at least one series, drawn against the
phase's own step (so 150 RL steps after 2000 SFT steps get an axis of their own). The held-out accuracy
panels come first, one per phase, on a shared y-axis, each after the first with a dotted line at the
accuracy the phase before ended on, so a jump between phases reads across them. Records
with no numeric ``step`` (e.g. a config header) are ignored; a missing ``phase`` counts as "unknown";
``null`` values are skipped. A series equal to one drawn before it in the same panel is not drawn again;
its name joins the first one's legend entry (rft with the verifier: "pass@n = kept").

Drawing uses a bare ``matplotlib.figure.Figure`` with the Agg canvas, so it
never needs a display and never touches pyplot's global state.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from posttrain.train.metrics import read_metrics

PHASE_COLORS = {"sft": "tab:blue", "rl": "tab:orange"}
_EXTRA_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
SERIES_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
SMOOTH_ABOVE = 20  # draw a moving average when a series has more points than this


def _number(value) -> float | None:
    """``value`` as a finite float, or None (for null, NaN, bools, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _phases(records: list[dict]) -> list[str]:
    """Phase names in order of first appearance."""
    return list(dict.fromkeys(r.get("phase", "unknown") for r in records))


def _color(phase: str, phases: list[str]) -> str:
    if phase in PHASE_COLORS:
        return PHASE_COLORS[phase]
    others = [p for p in phases if p not in PHASE_COLORS]
    return _EXTRA_COLORS[others.index(phase) % len(_EXTRA_COLORS)]


def _series(records: list[dict], phase: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in ``phase``, sorted by step, nulls dropped."""
    pts = [
        (r["step"], v)
        for r in records
        if r.get("phase", "unknown") == phase and (v := _number(r.get(key))) is not None
    ]
    pts.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points; output has ``len(y) - window + 1`` points."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    return (c[window:] - c[:-window]) / window


def _plot_line(ax: Axes, x: np.ndarray, y: np.ndarray, color: str, label: str, smooth: bool) -> None:
    """Raw series; when long and ``smooth``, faint raw plus a bold moving average."""
    if smooth and len(y) > SMOOTH_ABOVE:
        window = max(5, len(y) // 15)
        ax.plot(x, y, color=color, alpha=0.3, lw=0.8)
        ax.plot(x[window - 1 :], moving_average(y, window), color=color, lw=1.8, label=f"{label} (avg {window})")
    else:
        ax.plot(x, y, color=color, lw=1.2, marker="." if len(y) <= SMOOTH_ABOVE else None, label=label)


def _legend(ax: Axes, handles: list | None = None) -> None:
    """One-row legend above the axes, right of the left-aligned title, clear of the data."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0),
              ncol=len(handles), frameon=False, borderaxespad=0.1, handlelength=1.5)


@dataclass(frozen=True)
class Panel:
    """A kind of panel: its title, y label and the (metrics key, legend label) series it can draw."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]


ACCURACY = Panel("held-out accuracy (greedy)", "accuracy", (("accuracy", "accuracy"),))
PANELS = (  # the order on the page, after the accuracy panels; keys as in docs/metrics.md
    Panel("pair accuracy, r(chosen) > r(rejected)", "fraction of pairs",
          (("accuracy_train", "batch"), ("eval_accuracy", "held-out pairs"))),
    Panel("margin r(chosen) - r(rejected)", "margin", (("margin", "batch"), ("eval_margin", "held-out pairs"))),
    Panel("implicit reward r of chosen and rejected", "r",
          (("chosen_reward", "chosen"), ("rejected_reward", "rejected"),
           ("eval_chosen_reward", "chosen, held-out"), ("eval_rejected_reward", "rejected, held-out"))),
    Panel("log pi(y|x) of chosen and rejected", "summed log-prob",
          (("logp_chosen", "chosen"), ("logp_rejected", "rejected"))),
    Panel("the round's samples (training problems)", "fraction",
          (("pass_at_n", "pass@n"), ("kept_frac", "kept"), ("sample_accuracy", "sample accuracy"),
           ("score_mean", "mean score"))),
    Panel("reward (mean per batch)", "reward", (("reward_mean", "reward"), ("gold_score", "gold score"))),
    Panel("KL to reference", "KL", (("kl", "kl"),)),
    Panel("loss", "loss", (("loss", "training"), ("eval_loss", "held-out pairs"), ("sft_loss", "SFT NLL of chosen"))),
)


def _panel_series(records: list[dict], phase: str, panel: Panel) -> list[list]:
    """[key, label, x, y] of each of `panel`'s series with data in `phase`; a series equal to an earlier one
    is dropped and its label appended to the earlier one's (so no line hides another)."""
    drawn: list[list] = []
    for key, label in panel.series:
        x, y = _series(records, phase, key)
        if not len(x):
            continue
        same = [d for d in drawn if np.array_equal(d[2], x) and np.allclose(d[3], y, rtol=0, atol=1e-9)]
        if same:
            same[0][1] += f" = {label}"
        else:
            drawn.append([key, label, x, y])
    return drawn


def choose_panels(records: list[dict]) -> list[tuple[str, Panel, list[list]]]:
    """(phase, panel, series) for every panel with data: each phase's accuracy, then each phase's others."""
    phases = _phases(records)
    order = [(p, ACCURACY) for p in phases] + [(p, panel) for p in phases for panel in PANELS]
    found = [(p, panel, _panel_series(records, p, panel)) for p, panel in order]
    return [(p, panel, series) for p, panel, series in found if series]


def _draw_panel(ax: Axes, series: list[list], panel: Panel, color: str) -> None:
    """Training series smoothed when long; evaluation series (accuracy, eval_*) as points, held-out dashed;
    a held-out series takes the colour of its batch twin (eval_margin that of margin)."""
    base = lambda key: key.removeprefix("eval_").removesuffix("_train")  # noqa: E731
    bases = list(dict.fromkeys(base(key) for key, *_ in series))
    for key, label, x, y in series:
        c = color if len(bases) == 1 else SERIES_COLORS[bases.index(base(key)) % len(SERIES_COLORS)]
        if panel is ACCURACY or key.startswith("eval_"):
            ax.plot(x, y, color=c, ls="--" if key.startswith("eval_") else "-", marker="o", ms=3.5, lw=1.2,
                    label=label)
        else:
            _plot_line(ax, x, y, c, label, smooth=True)
    if panel is ACCURACY:  # the first and last value, so a phase's change reads without the grid
        x, y = series[0][2], series[0][3]
        for i, ha in (((0, "center"),) if len(x) == 1 else ((0, "left"), (len(x) - 1, "right"))):
            ax.annotate(f"{y[i]:.3f}", (x[i], y[i]), textcoords="offset points", xytext=(0, 6), ha=ha, fontsize=8)
        ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)


def draw_report(records: list[dict], title: str | None = None) -> Figure:
    """Draw the panels `choose_panels` picks for `records` (up to three side by side, more in two columns);
    returns the (unsaved) figure. With no data at all, one panel says so."""
    records = [r for r in records if _number(r.get("step")) is not None]
    phases, chosen = _phases(records), choose_panels(records)
    n = max(1, len(chosen))
    ncols = n if n <= 3 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=({1: 6, 2: 10, 3: 13}[ncols], 3.4 * nrows + 0.6), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:  # an odd count leaves one grid cell: no axes there rather than an empty one
        fig.delaxes(ax)
    if not chosen:
        axes[0].text(0.5, 0.5, "no metrics with a step", transform=axes[0].transAxes, ha="center", va="center",
                     color="0.5")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
    accuracy_axes = [ax for ax, (_, panel, _) in zip(axes, chosen) if panel is ACCURACY]
    for ax in accuracy_axes[1:]:
        ax.sharey(accuracy_axes[0])
    previous = None  # (phase, last held-out accuracy) of the accuracy panel before
    for i, (ax, (phase, panel, series)) in enumerate(zip(axes, chosen)):
        _draw_panel(ax, series, panel, _color(phase, phases))
        if panel is ACCURACY:  # where the phase before ended, so the change across phases reads in one panel
            if previous is not None:
                ax.axhline(previous[1], color=_color(previous[0], phases), ls=":", lw=1.2,
                           label=f"end of {previous[0]} ({previous[1]:.3f})")
                ax.legend(fontsize=7, loc="best", framealpha=0.85)
            previous = phase, series[0][3][-1]
        steps = [r["step"] for r in records if r.get("phase", "unknown") == phase]
        pad = max(0.5, 0.04 * (max(steps) - min(steps)))  # every panel of a phase spans all its steps
        ax.set_xlim(min(steps) - pad, max(steps) + pad)
        ax.set_title(f"({chr(ord('a') + i)}) {phase}: {panel.title}", loc="left", fontsize=10)
        ax.set_xlabel(f"{phase} step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_report(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Render ``metrics_path`` (a metrics.jsonl) to ``out_png`` and return its path.

    The PNG (10x7 in, 110 dpi) is written to a temporary file beside
    ``out_png`` and moved into place with ``os.replace``, so a reader never
    sees a half-written image. ``title`` defaults to the metrics file's
    parent directory name (usually the run name).
    """
    metrics_path, out_png = Path(metrics_path), Path(out_png)
    fig = draw_report(read_metrics(metrics_path), title or metrics_path.resolve().parent.name)
    return save_figure(fig, out_png)


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write `fig` as a PNG (110 dpi) atomically: a temporary file beside `out_png`, then os.replace."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same filesystem, so os.replace is atomic);
    # open(..., "xb") rather than mkstemp so the file gets the umask's usual mode, not 0600.
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, out_png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_png


def summarize_table(records: list[dict]) -> str:
    """Plain-text table of the accuracy evaluations (phase, step, accuracy), in file order."""
    rows = [r for r in records if "accuracy" in r]
    if not rows:
        return "no accuracy evaluations"
    cells = []
    for r in rows:
        acc = _number(r["accuracy"])
        cells.append((str(r.get("phase", "unknown")), str(r.get("step", "?")), "nan" if acc is None else f"{acc:.4f}"))
    header = ("phase", "step", "accuracy")
    w = [max(len(row[i]) for row in [header, *cells]) for i in range(3)]
    lines = [f"{header[0]:<{w[0]}}  {header[1]:>{w[1]}}  {header[2]:>{w[2]}}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{p:<{w[0]}}  {s:>{w[1]}}  {a:>{w[2]}}" for p, s, a in cells]
    return "\n".join(lines)
