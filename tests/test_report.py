"""plot_report draws a PNG from metrics.jsonl, a panel for each metric a phase logged; summarize_table lists the
evaluations; the best-of-n and RLHF figures keep every line visible and every note on the page."""

import math
import random

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from posttrain.train.metrics import MetricsLogger
from posttrain.train.report import draw_report, moving_average, plot_report, summarize_table
from posttrain.train.report_offline import draw_best_of_n
from posttrain.train.report_rlhf import draw_rlhf

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


def test_a_file_without_steps_plots_one_note(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    fig = draw_report([{"config": "header record without a step"}])
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["no metrics with a step"]
    assert plot_report(metrics, tmp_path / "r.png").read_bytes()[:8] == PNG_SIGNATURE


def titles(fig) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_each_phase_gets_its_own_step_axis_accuracy_first():
    fig = draw_report(synthetic_run(sft_steps=60))
    assert titles(fig) == ["(a) sft: held-out accuracy (greedy)", "(b) rl: held-out accuracy (greedy)",
                           "(c) sft: loss", "(d) rl: reward (mean per batch)", "(e) rl: KL to reference",
                           "(f) rl: loss"]
    sft_acc, rl_acc = fig.axes[0].get_lines()[0], fig.axes[1].get_lines()[0]
    assert list(sft_acc.get_xdata()) == [1, 20, 40, 60]
    assert list(rl_acc.get_xdata()) == [0, 20, 40, 60, 80]  # RL's own steps, not after SFT's
    assert fig.axes[1].get_xlim()[1] < 90
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # one accuracy scale across the phases
    end_of_sft = fig.axes[1].get_lines()[1]
    assert list(end_of_sft.get_ydata()) == [0.6, 0.6] and "end of sft (0.600)" in end_of_sft.get_label()
    assert len(fig.axes[3].get_lines()) == 2  # reward: raw and smoothed once there are more than ~20 points


def test_without_rl_only_the_sft_panels():
    fig = draw_report(synthetic_run(with_rl=False))
    assert titles(fig) == ["(a) sft: held-out accuracy (greedy)", "(b) sft: loss"]


def grid(phase, steps, every, train: dict, evals: dict, start_eval=True) -> list[dict]:
    """`phase` records with the `train` keys on every step and the `evals` keys every `every` steps (and at
    step 0 when `start_eval`); values are made-up curves: key's base value plus a small step-dependent term."""
    rng = random.Random(phase)
    rows = [{"step": 0, "phase": phase, **{k: v for k, v in evals.items()}}] if start_eval else []
    for step in range(1, steps + 1):
        row = {"step": step, "phase": phase, **{k: v + 0.01 * step + 0.01 * rng.random() for k, v in train.items()}}
        if step % every == 0:
            row.update({k: v + 0.002 * step for k, v in evals.items()})
        rows.append(row)
    return rows


# what each command logs (posttrain/recipes/*.py, docs/metrics.md), with the panels its report must show
SFT = grid("sft", 40, 20, {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 900.0}, {"accuracy": 0.1},
           start_eval=False)
RL = grid("rl", 30, 10, {"reward_mean": 0.5, "reward_std": 0.3, "kl": 0.01, "entropy": 0.8, "clip_frac": 0.0,
                         "loss": 0.0, "grad_norm": 0.5, "response_length": 3.5, "kl_coef": 0.01}, {"accuracy": 0.5})
RM = grid("rm", 30, 10, {"loss": 0.69, "accuracy_train": 0.5, "margin": 0.0, "grad_norm": 1.0, "lr": 1e-3},
          {"eval_accuracy": 0.5, "eval_margin": 0.0, "eval_loss": 0.69}, start_eval=False)
DPO = grid("dpo", 30, 10, {"loss": 0.69, "accuracy_train": 0.5, "margin": 0.1, "chosen_reward": 0.0,
                           "rejected_reward": -0.1, "logp_chosen": -3.0, "logp_rejected": -4.0, "sft_loss": 1.0},
           {"accuracy": 0.1, "eval_loss": 0.6, "eval_accuracy": 0.6, "eval_margin": 1.0,
            "eval_chosen_reward": -0.4, "eval_rejected_reward": -1.5})
DPO[0] = {"step": 0, "phase": "dpo", "accuracy": 0.1}  # the evaluation before any update: gold accuracy only
RFT = [{"step": 0, "phase": "rft", "round": 0, "accuracy": 0.03},
       *({"step": s, "phase": "rft", "round": 1 + (s > 10), "loss": 0.7 - s / 100} for s in range(1, 21)),
       {"step": 10, "phase": "rft", "round": 1, "accuracy": 0.08, "kept": 60, "kept_frac": 0.2,
        "sample_accuracy": 0.05, "pass_at_n": 0.2, "score_mean": 0.05},
       {"step": 20, "phase": "rft", "round": 2, "accuracy": 0.06, "kept": 57, "kept_frac": 0.19,
        "sample_accuracy": 0.052, "pass_at_n": 0.19, "score_mean": 0.052}]
COMMANDS = {
    "sft": (SFT, ["sft: held-out accuracy", "sft: loss"]),
    "rl": (RL, ["rl: held-out accuracy", "rl: reward", "rl: KL", "rl: loss"]),
    "demo": (SFT + RL, ["sft: held-out accuracy", "rl: held-out accuracy", "sft: loss", "rl: reward", "rl: KL",
                        "rl: loss"]),
    "rm": (RM, ["rm: pair accuracy", "rm: margin", "rm: loss"]),
    "rlhf pipeline": (SFT + RM, ["sft: held-out accuracy", "sft: loss", "rm: pair accuracy", "rm: margin",
                                 "rm: loss"]),
    "dpo": (DPO, ["dpo: held-out accuracy", "dpo: pair accuracy", "dpo: margin", "dpo: implicit reward",
                  "dpo: log pi", "dpo: loss"]),
    "rft": (RFT, ["rft: held-out accuracy", "rft: the round's samples", "rft: loss"]),
}


def panels_without_data(fig) -> list[str]:
    """Titles of the axes that draw no line with at least one finite point, or that show a placeholder."""
    def has_data(ax):
        return any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in ax.get_lines())
    return [ax.get_title(loc="left") for ax in fig.axes
            if not has_data(ax) or any("no " in t.get_text() for t in ax.texts)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_panel_of_every_command_has_data(command):
    records, expected = COMMANDS[command]
    fig = draw_report(records)
    assert panels_without_data(fig) == []
    got = titles(fig)
    assert len(got) == len(expected)
    for title, words in zip(got, expected, strict=True):
        assert words in title, (title, words)


def test_dpo_and_rm_plot_held_out_pairs_and_dpo_its_implicit_rewards():
    fig = draw_report(DPO)
    by_title = {ax.get_title(loc="left").split(": ", 1)[1]: ax for ax in fig.axes}
    labels = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert labels(by_title["pair accuracy, r(chosen) > r(rejected)"]) == ["batch (avg 5)", "held-out pairs"]
    assert "held-out pairs" in labels(by_title["margin r(chosen) - r(rejected)"])
    assert {"chosen (avg 5)", "rejected (avg 5)", "chosen, held-out", "rejected, held-out"} <= set(
        labels(by_title["implicit reward r of chosen and rejected"]))
    rm = {ax.get_title(loc="left"): ax for ax in draw_report(RM).axes}
    assert "held-out pairs" in labels(rm["(a) rm: pair accuracy, r(chosen) > r(rejected)"])


def test_a_series_equal_to_another_joins_its_legend_entry():
    fig = draw_report(RFT)
    samples = fig.axes[1]
    assert [t.get_text() for t in samples.get_legend().get_texts()] == ["pass@n = kept", "sample accuracy = mean score"]


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


def drawn(fig):
    """`fig` drawn on an Agg canvas; returns its renderer (for window extents)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def spilled(fig) -> list[str]:
    """Texts of `fig` that reach past their axes, and legends that reach past the figure."""
    renderer = drawn(fig)

    def inside(artist, box) -> bool:
        extent = artist.get_window_extent(renderer).padded(-1)  # a pixel of slack
        return box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1

    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return ([str(t) for ax in fig.axes for t in ax.texts if not inside(t, ax.bbox)]
            + [str(legend) for legend in legends if not inside(legend, fig.bbox)])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_report_texts_stay_on_the_page(command):
    assert spilled(draw_report(COMMANDS[command][0])) == []


def test_best_of_n_equal_to_pass_at_n_draws_both_lines_and_says_so():
    table = [{"n": n, "accuracy": a, "score_mean": a, "pass_at_k": a} for n, a in ((1, 0.05), (2, 0.1), (4, 0.2))]
    ax = draw_best_of_n(table, greedy=0.03).axes[0]
    passed, best = ax.get_lines()[:2]
    assert list(passed.get_ydata()) == list(best.get_ydata()) == [0.05, 0.1, 0.2]
    assert passed.get_linewidth() > 2 * best.get_linewidth() and passed.get_marker() != best.get_marker()
    assert "equal to best-of-n at every n" in passed.get_label()
    table[1]["pass_at_k"] = 0.15
    assert draw_best_of_n(table).axes[0].get_lines()[0].get_label() == "pass@n"


def test_rlhf_note_and_legends_stay_off_the_bars_and_on_the_page(tmp_path):
    for sub, keys in (("ppo", ("rm_score_mean", "gold_score", "kl")), ("ablation", ("rm_score_mean", "gold_score"))):
        write(tmp_path / sub / "metrics.jsonl",
              [{"step": s, "phase": "rl", **{k: s / 20 for k in keys}} for s in range(1, 21)])
    summary = {"sft_accuracy": 0.62, "ppo_accuracy": 0.97, "sft_rm_score": -1.5, "ppo_rm_score": 0.9,
               "ppo_kl": 1.03, "improvement": 0.35, "improvement_ci95": [0.3, 0.4], "eval_problems": 500,
               "ablation": {"accuracy": 0.95, "rm_score": 0.95, "kl": 123.4}}
    fig = draw_rlhf(tmp_path, summary)
    assert spilled(fig) == []
    kl_panel, bars = fig.axes[2], fig.axes[3]
    assert len(kl_panel.texts) == 0 and "held-out KL 123.4" in kl_panel.get_legend().get_texts()[1].get_text()
    renderer = drawn(fig)
    legend = bars.get_legend().get_window_extent(renderer)
    patches = [p for ax in fig.axes[3:] for p in ax.patches]
    assert len(patches) == 6 and not any(legend.overlaps(p.get_window_extent(renderer)) for p in patches)
