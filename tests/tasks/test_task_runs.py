"""`posttrain rl CONFIG` on the data tasks, end to end: two GRPO steps on gsm8k and on mbpp (the samples of the real
data files in tests/data/samples, a tiny local HF model with a byte-level BPE tokenizer), and the one-line errors a
user sees."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from posttrain.cli import main
from tests.tasks.conftest import GSM8K, MBPP


def write_config(tmp_path, model_dir, task: dict) -> str:
    cfg = {"seed": 0, "threads": 1, "progress": False, "output_dir": str(tmp_path / "run"),
           "model": {"path": str(model_dir)}, "task": task,
           "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "mini_batches": 1, "max_new_tokens": 16,
                  "warmup_steps": 1, "eval_every": 0, "kl_coef": 0.05},
           "eval": {"batch_size": 16, "max_new_tokens": 16}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def rl_records(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("step", 0) > 0]


def test_grpo_on_gsm8k(tmp_path, hf_model_dir, capsys):
    # The sample: the real file's first 200 rows (and one more): real text, a quick start.
    config = write_config(tmp_path, hf_model_dir, {"name": "gsm8k", "path": str(GSM8K), "num_eval": 4})
    code, out, err = run(capsys, "rl", config)
    assert code == 0, err
    records = rl_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["response_length"] > 0 for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_problems"] == 4 and "on 4 problems" in out
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_grpo_on_mbpp_runs_the_sandbox_and_leaves_nothing_running(tmp_path, hf_model_dir, capsys):
    config = write_config(tmp_path, hf_model_dir, {"name": "mbpp", "path": str(MBPP),
                                                   "hf_eval_split": "prompt", "sandbox_timeout_s": 3.0})
    code, _, err = run(capsys, "rl", config)
    assert code == 0, err
    records = rl_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all("reward_mean" in r for r in records)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_problems"] == 10
    assert not [t for t in threading.enumerate() if t.name.startswith("sandbox")]


def test_missing_task_file_is_one_line_and_exit_2(tmp_path, hf_model_dir, capsys):
    missing = tmp_path / "nowhere" / "train.jsonl"
    config = write_config(tmp_path, hf_model_dir, {"name": "gsm8k", "path": str(missing)})
    code, _, err = run(capsys, "rl", config)
    assert code == 2
    assert err == f"posttrain rl: error: {missing}: no such file\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["task.path=null"], "task gsm8k has no data: set task.path"),
    (["model.path=null"], "task gsm8k needs a tokenizer that covers its text; set model.path to a Hugging Face "
                          "model directory"),
    (["rl.prompts_per_step=9"], "task gsm8k: 8 training problems left (need 9 for rl.prompts_per_step)"),
])
def test_data_task_user_errors_are_one_line_and_exit_2(tmp_path, hf_model_dir, capsys, overrides, message):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = write_config(tmp_path, hf_model_dir, {"name": "gsm8k", "path": str(data), "num_eval": 2})
    code, _, err = run(capsys, "rl", config, *overrides)
    assert code == 2 and err.count("\n") == 1 and message in err, err
