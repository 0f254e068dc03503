"""Environments in RL runs: names resolved from the config (one-line errors), a short RL run in the reflection
environment (the loop's ratio invariant holds on multi-turn batches), a user's environment from a path in a
`posttrain rl` run, and the rollout log."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.config import EnvConfig
from posttrain.errors import ConfigError
from posttrain.models import build_tiny_model, save_pretrained
from posttrain.rl.loop import RLRun
from posttrain.rollout.env import EnvContext, SingleTurn, env_factory, resolve_env
from posttrain.rollout.reflection import Reflection
from posttrain.tasks import ArithmeticTask
from posttrain.train.optim import PhaseTimer
from posttrain.train.rollout_log import rollout_log_hook
from tests.rollout.helpers import SCRIPTED, likely_to_stop


def test_env_names_resolve_or_fail_in_one_line(tmp_path, monkeypatch):
    assert resolve_env("single_turn") is SingleTurn and resolve_env("reflection") is Reflection
    assert resolve_env(SCRIPTED).__name__ == "Scripted"
    (tmp_path / "my_envs.py").write_text("from posttrain.rollout.env import SingleTurn\n\nclass Mine(SingleTurn):\n"
                                         "    pass\n\nNOT_A_CLASS = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_env("my_envs:Mine").__name__ == "Mine"
    for name, words in (("no_such_module_xyz:Env", "no module named 'no_such_module_xyz'"),
                        ("my_envs:Missing", "has no 'Missing' (it has Mine"),
                        ("my_envs:NOT_A_CLASS", "not an environment class"),
                        (f"{tmp_path / 'gone.py'}:Env", "no such file"),
                        ("my_envs", "neither a built-in")):
        with pytest.raises(ConfigError, match="env.name") as err:
            resolve_env(name)
        assert words in str(err.value) and "\n" not in str(err.value)
    ctx = EnvContext(EnvConfig(name=SCRIPTED, kwargs={"turnz": 2}), None, None, False)
    with pytest.raises(ConfigError, match="env.kwargs"):
        env_factory(ctx)
    ctx = EnvContext(EnvConfig(name=SCRIPTED, kwargs={"turns": 2}), None, None, False)
    first, second = env_factory(ctx)(), env_factory(ctx)()
    assert first is not second and first.turns == 2  # one instance per trajectory


def test_a_short_rl_run_in_the_reflection_environment_keeps_the_ratio_at_one(make_config, tiny_model, tokenizer,
                                                                             tmp_path):
    likely_to_stop(tiny_model, tokenizer.eos_token_id)
    cfg = make_config(tmp_path, "env.name=reflection", "env.kwargs={feedback: wrong}", "rl.max_new_tokens=5",
                      "rl.log_rollouts_every=1", "rl.missing_eos_penalty=1.0")  # the truncated score lower
    task = ArithmeticTask(cfg.task, cfg.seed)
    run = RLRun.local(cfg, tiny_model, tokenizer, task)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    for _ in range(2):
        metrics = run.step()  # check_invariants: the first minibatch's |log ratio| <= rl.ratio_tolerance
        assert metrics["first_log_ratio_max"] <= cfg.rl.ratio_tolerance
        assert metrics["env/turns"] > 1.2 and metrics["env/tool_calls"] == 0
    assert any(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters())

    # the rollout log of a step (what the loop writes with rl.log_rollouts_every)
    data, _, _ = run.sample(3, PhaseTimer())
    rollout_log_hook(cfg, tokenizer)(3, data.batch, data.scores, data.gold)
    rollout_log_hook(cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"log_rollouts_every": 2})}),
                     tokenizer)(3, data.batch, data.scores, data.gold)  # not a multiple of 2: nothing written
    # steps 1 and 2 by the loop, 3 by the first hook above, nothing by the second
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == [f"step_00000{i}.jsonl" for i in (1, 2, 3)]
    lines = [json.loads(x) for x in (tmp_path / "rollouts" / "step_000003.jsonl").read_text().splitlines()]
    assert len(lines) == len(data.batch)
    for i, (rec, problem) in enumerate(zip(lines, data.problems, strict=True)):
        n = int(data.batch.response_mask[i].sum())
        assert "".join(s["text"] for s in rec["segments"]) == tokenizer.decode(data.batch.response_ids[i, :n])
        assert sum(s["tokens"] for s in rec["segments"]) == n
        assert sum(s["tokens"] for s in rec["segments"] if s["loss"]) == int(data.batch.loss_mask[i].sum())
        assert [s["role"] for s in rec["segments"]] == ["assistant", "user"] * (rec["turns"] - 1) + ["assistant"]
        assert all(s["text"] == "user: wrong\n" for s in rec["segments"] if s["role"] == "user")
        assert rec["prompt"] == problem.prompt and rec["reward"] == pytest.approx(float(data.scores[i]))
        assert rec["gold"] == float(data.gold[i]) and len(rec["steps"]) == rec["turns"] - (rec["truncated"] is not None)
    assert any(r["turns"] > 1 for r in lines)


TINY = ["threads=1", "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.intermediate_size=64", "task.num_eval=20", "task.max_operand=20",
        "rl.steps=2", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=5", "rl.eval_every=0",
        "eval.batch_size=20", "eval.max_new_tokens=4", "rl.log_rollouts_every=1"]


def test_posttrain_rl_runs_a_user_environment_from_a_path(make_config, tokenizer, tmp_path, capsys):
    model = build_tiny_model(make_config(tmp_path).model, tokenizer, seed=0)
    likely_to_stop(model, tokenizer.eos_token_id)
    save_pretrained(model, tokenizer, tmp_path / "start")
    config = tmp_path / "rl.yaml"
    config.write_text("seed: 0\n")
    out = tmp_path / "run"
    code = main(["rl", str(config), f"model.path={tmp_path / 'start'}", f"output_dir={out}", f"env.name={SCRIPTED}",
                 "env.kwargs={turns: 2}", *TINY])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "rl" and "env/turns" in r]
    assert len(steps) == 2 and all(1 < r["env/turns"] <= 2 for r in steps)

    capsys.readouterr()
    code = main(["rl", str(config), f"model.path={tmp_path / 'start'}", f"output_dir={tmp_path / 'bad'}",
                 "env.name=no_such_env_module:Env", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "env.name" in err and "no_such_env_module" in err


def test_posttrain_rl_writes_the_rollout_log(make_config, tokenizer, tmp_path):
    model = build_tiny_model(make_config(tmp_path).model, tokenizer, seed=0)
    likely_to_stop(model, tokenizer.eos_token_id)
    save_pretrained(model, tokenizer, tmp_path / "start")
    config = tmp_path / "rl.yaml"
    config.write_text("seed: 0\n")
    out = tmp_path / "run"
    assert main(["rl", str(config), f"model.path={tmp_path / 'start'}", f"output_dir={out}", f"env.name={SCRIPTED}",
                 "env.kwargs={turns: 2}", *TINY]) == 0
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]
    log = [json.loads(x) for x in (out / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
    assert len(log) == 16 and any(s["text"] == "tool: turn 1\n" and not s["loss"] for r in log for s in r["segments"])
