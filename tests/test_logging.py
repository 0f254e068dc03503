"""MetricsLogger writes strict JSON lines; read_metrics reads them back."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.train.metrics import MetricsLogger, read_metrics


def test_round_trip_converts_tensors_numpy_and_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 0, "phase": "sft", "loss": torch.tensor(2.5), "lr": 1e-4},
        {"step": 1, "phase": "rl", "reward_mean": np.float32(0.25), "n": np.int64(7),
         "kl": float("nan"), "entropy": torch.tensor(float("inf")), "ok": np.bool_(True),
         "per_task": {"add": np.float64(0.5), "mul": [1, float("-inf")]}},
        {"step": 2, "phase": "rl", "accuracy": 0.1 + 0.2},  # 0.30000000000000004: full precision
    ]
    with MetricsLogger(path) as log:
        for r in records:
            log.log(r)
        assert log.lines_written == 3

    back = read_metrics(path)
    assert back[0] == {"step": 0, "phase": "sft", "loss": 2.5, "lr": 1e-4}
    assert list(back[1]) == ["step", "phase", "reward_mean", "n", "kl", "entropy", "ok", "per_task"]
    assert back[1]["reward_mean"] == 0.25 and type(back[1]["n"]) is int and back[1]["n"] == 7
    assert back[1]["kl"] is None and back[1]["entropy"] is None and back[1]["ok"] is True
    assert back[1]["per_task"] == {"add": 0.5, "mul": [1, None]}
    assert back[2]["accuracy"] == 0.1 + 0.2
    # Strict JSON: no NaN/Infinity tokens in the file.
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in text.splitlines())


def test_float32_tensor_keeps_its_exact_value(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        log.log({"x": torch.tensor(0.1, dtype=torch.float32)})
    assert read_metrics(path)[0]["x"] == torch.tensor(0.1, dtype=torch.float32).item() != 0.1


def test_each_line_is_flushed_before_close(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path)
    log.log({"step": 1})
    assert read_metrics(path) == [{"step": 1}]
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        log.log({"step": 2})


def test_append_continues_the_file(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # parent is created
    with MetricsLogger(path) as log:
        log.log({"step": 1})
        log.log({"step": 2})
    with MetricsLogger(path, append=True) as log:
        log.log({"step": 3})
        assert log.lines_written == 1
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with MetricsLogger(path) as log:  # append=False truncates
        log.log({"step": 9})
    assert read_metrics(path) == [{"step": 9}]


def test_append_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="incomplete last line"):
        log = MetricsLogger(path, append=True)
    with log:
        log.log({"step": 2})
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_unjsonable_value_names_the_key_and_writes_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        with pytest.raises(TypeError, match="'bad'"):
            log.log({"step": 1, "bad": object()})
        with pytest.raises(TypeError, match=r"'hist'.*shape \(3,\)"):
            log.log({"step": 1, "hist": torch.zeros(3)})
        with pytest.raises(TypeError, match=r"'cfg\.opt'"):
            log.log({"cfg": {"opt": {1, 2}}})
        with pytest.raises(TypeError, match="not a str"):
            log.log({1: 2.0})
        assert log.lines_written == 0
    assert path.read_text() == ""


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 3: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2: expected a JSON object"):
        read_metrics(path)


def test_nan_token_written_by_other_tools_is_still_readable(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"kl": NaN}\n')
    assert math.isnan(read_metrics(path)[0]["kl"])
