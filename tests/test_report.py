"""plot_report draws a PNG from metrics.jsonl; summarize_table lists the evaluations."""

import math
import random

import numpy as np
import pytest

from posttrain.logging import MetricsLogger
from posttrain.report import draw_report, moving_average, plot_report, summarize_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_run(sft_steps=60, rl_steps=80, with_rl=True) -> list[dict]:
    """SFT then RL training records, with eval-only records every 20 steps."""
    rng = random.Random(0)
    records = []
    for step in range(1, sft_steps + 1):
        records.append({"step": step, "phase": "sft", "loss": 3.0 * math.exp(-step / 20) + rng.random() * 0.1,
                        "grad_norm": 1.0 + rng.random()})
        if step % 20 == 0 or step == 1:
            records.append({"step": step, "phase": "sft", "accuracy": min(1.0, step / 100)})
    if not with_rl:
        return records
    records.append({"step": 0, "phase": "rl", "accuracy": 0.6})  # eval before the first RL update
    for step in range(1, rl_steps + 1):
        records.append({"step": step, "phase": "rl", "loss": rng.gauss(0, 0.02),
                        "reward_mean": min(1.0, 0.4 + step / 150 + rng.gauss(0, 0.1)),
                        "kl": step * 1e-4 + rng.random() * 1e-4, "entropy": 1.0, "clip_frac": 0.1,
                        "grad_norm": 0.5})
        if step % 20 == 0:
            records.append({"step": step, "phase": "rl", "accuracy": 0.6 + step / 400})
    records[5]["kl"] = None  # a NaN that was logged as null
    return records


def write(path, records):
    with MetricsLogger(path) as log:
        for r in records:
            log.log(r)
    return path


def test_plot_report_writes_a_png(tmp_path):
    metrics = write(tmp_path / "metrics.jsonl", synthetic_run())
    out = plot_report(metrics, tmp_path / "plots" / "report.png", title="synthetic")
    assert out == tmp_path / "plots" / "report.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["report.png"]  # no temp file left behind


def test_only_sft_records_still_plot(tmp_path):
    metrics = write(tmp_path / "metrics.jsonl", synthetic_run(with_rl=False))
    out = plot_report(metrics, tmp_path / "report.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_empty_file_plots_no_data_panels(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    fig = draw_report([{"config": "header record without a step"}])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == ["no accuracy data", "no reward_mean data", "no kl data", "no loss data"]
    assert plot_report(metrics, tmp_path / "r.png").read_bytes()[:8] == PNG_SIGNATURE


def test_rl_steps_are_offset_after_sft_on_the_global_axis():
    fig = draw_report(synthetic_run(sft_steps=60))
    acc_ax = fig.axes[0]
    sft_line, rl_line = acc_ax.get_lines()[:2]
    assert list(sft_line.get_xdata()) == [1, 20, 40, 60]
    assert list(rl_line.get_xdata()) == [61, 81, 101, 121, 141]  # RL step 0 drawn just after SFT's last
    # Panel (b) has raw and smoothed reward once there are more than ~20 points.
    reward_ax = fig.axes[1]
    assert len(reward_ax.get_lines()) == 2
    # Panel (d) puts RL loss on a right-hand axis.
    assert len(fig.axes) == 5


def test_panels_without_rl_say_no_data():
    fig = draw_report(synthetic_run(with_rl=False))
    assert [t.get_text() for t in fig.axes[1].texts] == ["no reward_mean data"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["no kl data"]
    assert len(fig.axes) == 4  # single-phase loss: no twin axis


def test_moving_average_matches_a_loop():
    y = np.arange(10, dtype=float) ** 2
    expected = [np.mean(y[i - 2 : i + 1]) for i in range(2, 10)]
    np.testing.assert_allclose(moving_average(y, 3), expected)


def test_summarize_table_lists_evaluations_in_order():
    table = summarize_table(synthetic_run(sft_steps=40, rl_steps=40))
    lines = table.splitlines()
    assert lines[0].split() == ["phase", "step", "accuracy"]
    assert set(lines[1]) == {"-"}
    rows = [line.split() for line in lines[2:]]
    assert rows == [["sft", "1", "0.0100"], ["sft", "20", "0.2000"], ["sft", "40", "0.4000"],
                    ["rl", "0", "0.6000"], ["rl", "20", "0.6500"], ["rl", "40", "0.7000"]]


def test_summarize_table_handles_null_and_no_evaluations():
    assert summarize_table([{"step": 1, "phase": "sft", "loss": 1.0}]) == "no accuracy evaluations"
    table = summarize_table([{"step": 3, "phase": "rl", "accuracy": None}])
    assert table.splitlines()[-1].split() == ["rl", "3", "nan"]


@pytest.mark.parametrize("phase", ["dpo", "rm"])
def test_other_phase_names_are_drawn(phase):
    records = [{"step": s, "phase": phase, "loss": 1.0 / s, "accuracy": s / 10} for s in range(1, 6)]
    fig = draw_report(records)
    assert len(fig.axes[0].get_lines()) == 1
