"""logging.report_to (posttrain/train/tracking.py): TensorBoard event files hold every scalar of metrics.jsonl at
its step, and the held-out samples as a text table, also after a crash and --resume; a tracker whose package is
missing stops the command in one line (exit 2) before any model loads; W&B writes an offline run directory."""

import json
import sys

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.config import build_config, dump_config
from posttrain.recipes.sft import run_sft
from posttrain.train.metrics import MetricsLogger, read_metrics
from posttrain.train.tracking import TensorBoardSink, markdown_table, scalars, wandb_mode
from tests.conftest import tiny_run_dict

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TB = "logging.report_to=[jsonl,tensorboard]"


def tiny_yaml(tmp_path, *overrides) -> str:
    path = tmp_path / "tiny.yaml"
    dump_config(build_config(tiny_run_dict(tmp_path / "run"), list(overrides)), path)
    return str(path)


def events(run_dir, phase: str) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard" / phase), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should hold it: tag -> [(step, value as float32)], in order."""
    want: dict[str, list] = {}
    for r in records:
        for key, value in scalars(r).items():
            want.setdefault(f"{r['phase']}/{key}", []).append((r["step"], float(np.float32(value))))
    return want


def stored_scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def sample_tables(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_tensorboard_holds_every_scalar_of_an_rl_run_and_the_sample_tables(tmp_path):
    assert main(["rl", tiny_yaml(tmp_path, TB, "rl.eval_every=1", "logging.sample_generations=3")]) == 0
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert {r["phase"] for r in records} == {"rl"} and [r["step"] for r in records] == [0, 1, 2]
    acc = events(run, "rl")
    want = expected_scalars(records)
    assert {"rl/accuracy", "rl/reward_mean", "rl/loss", "rl/kl", "rl/time/update"} <= set(want)
    assert stored_scalars(acc) == want  # every tag, step and value (float32, as TensorBoard stores it)
    tables = sample_tables(acc, "rl/samples")
    assert sorted(tables) == [0, 1, 2]  # the evaluation before training and one per eval_every
    lines = tables[2].splitlines()
    assert lines[:2] == ["| prompt | response | reward |", "|---|---|---|"] and len(lines) == 2 + 3
    assert all(line.startswith("| ") and line.count(" | ") >= 2 for line in lines[2:])


class Crash(Exception):
    pass


def test_tensorboard_after_a_crash_and_resume_equals_metrics_jsonl(tmp_path, monkeypatch):
    """The interrupted run wrote steps past its checkpoint; the resumed one's events hide them (purge_step)."""
    cfg = build_config(tiny_run_dict(tmp_path / "run"), [TB, "sft.steps=6", "sft.eval_every=2",
                                                        "checkpoint.every=2"])
    original, seen = MetricsLogger.log, {"n": 0}

    def crash_after_five(self, record):
        original(self, record)
        seen["n"] += 1
        if seen["n"] == 5:  # steps 1-5 written, checkpoint at step 4
            raise Crash

    monkeypatch.setattr(MetricsLogger, "log", crash_after_five)
    with pytest.raises(Crash):
        run_sft(cfg)
    monkeypatch.setattr(MetricsLogger, "log", original)
    run_sft(cfg, resume=True)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    acc = events(tmp_path / "run", "sft")
    assert stored_scalars(acc) == expected_scalars(records)
    assert sorted(sample_tables(acc, "sft/samples")) == [2, 4, 6]


def test_a_resumed_phase_keeps_its_earlier_steps_and_a_later_phase_starts_over(tmp_path):
    """TensorBoardSink on its own: the kept records decide each phase's purge step."""
    root = tmp_path / "tensorboard"
    first = TensorBoardSink(root, None)
    for step in range(1, 5):
        first.log({"step": step, "phase": "sft", "loss": float(step)}, step)
    first.log({"step": 1, "phase": "rl", "loss": 9.0}, 1)  # written after the checkpoint: stale
    first.close()
    kept = [{"step": s, "phase": "sft", "loss": float(s)} for s in (1, 2)]
    again = TensorBoardSink(root, kept)
    for step in (3, 4):
        again.log({"step": step, "phase": "sft", "loss": 10.0 + step}, step)
    again.log({"step": 1, "phase": "rl", "loss": 7.0}, 1)
    again.close()
    sft = [(e.step, e.value) for e in events(tmp_path, "sft").Scalars("sft/loss")]
    assert sft == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert [(e.step, e.value) for e in events(tmp_path, "rl").Scalars("rl/loss")] == [(1, 7.0)]
    TensorBoardSink(root, None).close()  # a new run starts from an empty directory
    assert not root.exists() or not any(root.rglob("events.*"))


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_without_its_package_is_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, tracker,
                                                                         package):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker was checked")

    monkeypatch.setattr("posttrain.train.run.load_policy", no_model)
    path = tiny_yaml(tmp_path, f"logging.report_to=[jsonl,{tracker}]")
    capsys.readouterr()
    assert main(["sft", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install {package}" in err[0] and "logging.report_to" in err[0], err
    assert not (tmp_path / "run").exists()


def test_scalars_are_the_finite_numbers_of_a_record_with_nested_keys_joined():
    record = {"step": 3, "phase": "rl", "loss": 0.5, "skipped_steps": 0, "kl": None, "note": "x",
              "reward": {"errors": 1, "fn": 0.25}, "lengths": [1, 2], "inf": float("inf")}
    assert scalars(record) == {"loss": 0.5, "skipped_steps": 0.0, "reward/errors": 1.0, "reward/fn": 0.25}


def test_markdown_table_escapes_pipes_and_newlines():
    table = markdown_table([{"prompt": "a|b", "response": "x\ny", "reward": 1.0},
                            {"prompt": "p", "response": "", "reward": 0.5}])
    assert table.splitlines()[2:] == ["| a\\|b | x<br>y | 1 |", "| p | *(empty)* | 0.5 |"]


def test_wandb_mode_is_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert wandb_mode() == ("offline", "no API key (wandb login)")


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(key, str(value))
    assert main(["sft", tiny_yaml(tmp_path, "logging.report_to=[jsonl,wandb]", "sft.eval_every=2")]) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sft_accuracy"] >= 0
