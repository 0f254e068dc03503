"""A one-page PNG report of a run, drawn from its metrics.jsonl.

Records carry ``step`` (counted per phase) and ``phase`` ("sft", "rl", ...),
plus any of ``loss``, ``reward_mean``, ``accuracy`` (held-out exact match, on
evaluation records only), ``kl``. Four panels:

    (a) accuracy   vs global step   (b) RL reward_mean vs step
    (c) KL         vs step          (d) loss (every phase) vs global step

The global step lays phases end to end in the order they first appear in the
file: phase k's step s is drawn at ``end of phase k-1 + 1 + (s - first step
of phase k)``. Records with no numeric ``step`` (e.g. a config header) are
ignored; a missing ``phase`` counts as "unknown"; ``null`` values are skipped.

Drawing uses a bare ``matplotlib.figure.Figure`` with the Agg canvas, so it
never needs a display and never touches pyplot's global state.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .logging import read_metrics

PHASE_COLORS = {"sft": "tab:blue", "rl": "tab:orange"}
_EXTRA_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
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


def _offsets(records: list[dict], phases: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per phase: (offset, global start, global end) so that global = offset + step."""
    spans = {}
    end = None
    for phase in phases:
        steps = [r["step"] for r in records if r.get("phase", "unknown") == phase]
        first, last = min(steps), max(steps)
        offset = 0.0 if end is None else end + 1 - first
        spans[phase] = (offset, offset + first, offset + last)
        end = offset + last
    return spans


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


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


def _fmt_step(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _shade_phases(ax: Axes, spans: dict, phases: list[str]) -> None:
    """Tint each phase's span of the global axis, dash each boundary, and name the
    spans in the x label (text inside the axes would collide with the data)."""
    for i, phase in enumerate(phases):
        _, start, end = spans[phase]
        ax.axvspan(start - 0.5, end + 0.5, color=_color(phase, phases), alpha=0.07, lw=0)
        if i > 0:
            ax.axvline(start - 0.5, color="0.4", ls="--", lw=1)
    ranges = ", ".join(f"{p} {_fmt_step(spans[p][1])}\u2013{_fmt_step(spans[p][2])}" for p in phases)
    ax.set_xlabel(f"global step ({ranges})")


def _accuracy_panel(ax: Axes, records: list[dict], phases: list[str], spans: dict) -> None:
    drawn = False
    for phase in phases:
        x, y = _series(records, phase, "accuracy")
        if len(x):
            ax.plot(x + spans[phase][0], y, color=_color(phase, phases), marker="o", ms=4, lw=1.2, label=phase)
            ax.annotate(f"{y[-1]:.3f}", (x[-1] + spans[phase][0], y[-1]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
            drawn = True
    ax.set_title("(a) held-out accuracy", loc="left", fontsize=10)
    if not drawn:
        return _no_data(ax, "accuracy")
    _shade_phases(ax, spans, phases)
    ax.margins(y=0.12)  # room for the value labels
    ax.set_ylabel("accuracy")
    _legend(ax)


def _per_phase_panel(ax: Axes, records, phases, key: str, title: str, smooth: bool, skip=("sft",)) -> None:
    """``key`` against each phase's own step, for phases not in ``skip``."""
    drawn = False
    for phase in phases:
        x, y = _series(records, phase, key)
        if phase not in skip and len(x):
            _plot_line(ax, x, y, _color(phase, phases), f"{phase} {key}", smooth)
            drawn = True
    ax.set_title(title, loc="left", fontsize=10)
    if not drawn:
        return _no_data(ax, key)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    _legend(ax)


def _loss_panel(ax: Axes, records, phases, spans) -> None:
    """Loss of every phase on the global axis; later phases on a right-hand axis
    (an RL surrogate loss lives on a very different scale from SFT cross-entropy)."""
    with_loss = [p for p in phases if len(_series(records, p, "loss")[0])]
    ax.set_title("(d) loss", loc="left", fontsize=10)
    if not with_loss:
        return _no_data(ax, "loss")
    _shade_phases(ax, spans, phases)
    twin = ax.twinx() if len(with_loss) > 1 else None
    handles = []
    for i, phase in enumerate(with_loss):
        target = ax if i == 0 else twin
        x, y = _series(records, phase, "loss")
        _plot_line(target, x + spans[phase][0], y, _color(phase, phases), f"{phase} loss", smooth=True)
        handles += target.get_legend_handles_labels()[0][-1:]
    ax.set_ylabel(f"{with_loss[0]} loss", color=_color(with_loss[0], phases))
    if twin is not None:
        later = with_loss[1:]
        twin.set_ylabel(" / ".join(f"{p} loss" for p in later),
                        color=_color(later[0], phases) if len(later) == 1 else "0.2")
    _legend(ax, handles)


def draw_report(records: list[dict], title: str | None = None) -> Figure:
    """Draw the four-panel report for ``records``; returns the (unsaved) figure."""
    records = [r for r in records if _number(r.get("step")) is not None]
    phases = _phases(records)
    spans = _offsets(records, phases)
    fig = Figure(figsize=(10, 7), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    _accuracy_panel(a, records, phases, spans)
    _per_phase_panel(b, records, phases, "reward_mean", "(b) RL reward (mean per batch)", smooth=True)
    _per_phase_panel(c, records, phases, "kl", "(c) KL to reference", smooth=False)
    _loss_panel(d, records, phases, spans)
    if title:
        fig.suptitle(title)
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
    for ax in fig.axes:  # includes the loss panel's right-hand axis
        ax.tick_params(labelsize=8)
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
