"""`demo --pipeline real` and the ifeval task (issue 17), without the 98 MB model: a tiny random Llama with
SmolLM2's real tokenizer and chat template stands in, saved where model.path points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("if_verifiable")

from posttrain.cli import main  # noqa: E402
from posttrain.recipes.demo_real import ensure_model, examples, real_config  # noqa: E402
from posttrain.tasks.instructions import KINDS, InstructionsTask, follows, instruction_reward  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_is_the_demo_run():
    shipped = yaml.safe_load((REPO / "configs" / "grpo_ifeval.yaml").read_text())
    a = real_config(shipped, ["output_dir=x"]).model_dump()
    b = real_config(None, ["output_dir=x"]).model_dump()
    assert a == b


def test_held_out_requests_are_never_trained_on_and_every_kind_is_held_out():
    task = InstructionsTask(seed=0, num_eval=320)
    assert len(task.eval_problems) == 320
    assert not {p.request for p in task.eval_problems} & {p.request for p in task.train_problems}
    assert {p.instruction_id for p in task.eval_problems} == set(KINDS)
    again = InstructionsTask(seed=0, num_eval=320)
    assert [p.prompt for p in again.eval_problems] == [p.prompt for p in task.eval_problems]
    assert [p.prompt for p in InstructionsTask(seed=1, num_eval=320).eval_problems] != \
        [p.prompt for p in task.eval_problems]


@pytest.mark.parametrize("iid, kwargs, good, bad", [
    ("change_case:english_lowercase", {}, "the sea is calm and blue today.", "The sea is calm."),
    ("punctuation:no_comma", {}, "a b c", "a, b"),
    ("startend:quotation", {}, '"hello there"', "hello there"),
    ("startend:end_checker", {"end_phrase": "That is all."}, "Fine. That is all.", "That is all. Bye"),
    ("detectable_format:title", {}, "<<Joy>>\nwords", "Joy\nwords"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "one two", "a b c d e f g"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi."),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "a river, a stone", "a river"),
])
def test_the_reward_is_ifevals_strict_check(iid, kwargs, good, bad):
    assert follows(good, iid, kwargs) and not follows(bad, iid, kwargs) and not follows("  ", iid, kwargs)
    assert instruction_reward(["p", "p"], [good, bad], [iid, iid], [kwargs, kwargs]) == [1.0, 0.0]


def test_examples_prefer_what_was_learned():
    task = InstructionsTask(seed=0, num_eval=16)
    probs = task.eval_problems
    j = next(i for i in range(6, 16) if probs[i].instruction_id != probs[5].instruction_id)
    before, after = [0.0] * 16, [0.0] * 16
    after[5] = after[j] = 1.0
    shown = examples(probs, before, after, [f"b{i}" for i in range(16)], [f"a{i}" for i in range(16)], n=3)
    assert [s["after"] for s in shown[:2]] == ["a5", f"a{j}"] and shown[0]["after_ok"] and not shown[0]["before_ok"]
    assert len(shown) == 3 and len({s["instruction"] for s in shown}) == 3  # one per constraint


def test_a_missing_model_without_the_wheel_is_one_line(tmp_path, monkeypatch):
    import posttrain.recipes.demo_real as demo_real

    monkeypatch.setattr(demo_real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo_real.PosttrainError, match="run make real-model"):
        ensure_model(tmp_path / "nothing")


@pytest.mark.parametrize("peft", [[], ["model.peft=lora", "model.lora.r=4", "rl.lr=1e-4"]], ids=["full", "lora"])
def test_demo_real_end_to_end(tmp_path, stand_in, capsys, peft):
    out = tmp_path / "real"
    rc = main(["demo", "--pipeline", "real", "--output-dir", str(out), f"model.path={stand_in}", "model.dtype=float32",
               "task.num_eval=8", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=8",
               "rl.micro_batch_size=4", "eval.max_new_tokens=8", "eval.batch_size=8", "threads=1", "progress=false",
               *peft])
    assert rc == 0, capsys.readouterr().err
    if peft:  # final/ is the merged model, final/adapter/ the adapter alone
        pytest.importorskip("peft")
        assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("start_accuracy", "rl_accuracy", "eval_problems", "lift_ci95", "seed", "wall_seconds", "examples",
                "by_constraint"):
        assert key in summary
    assert summary["eval_problems"] == 8 and summary["lift"] == pytest.approx(
        summary["rl_accuracy"] - summary["start_accuracy"])
    lo, hi = summary["lift_ci95"]
    assert lo <= summary["lift"] <= hi
    assert (out / "report.png").stat().st_size > 0 and (out / "examples.png").stat().st_size > 0
    assert (out / "final" / "config.json").is_file()
    assert "held-out instruction following:" in capsys.readouterr().out
