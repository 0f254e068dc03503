"""`demo --pipeline tools` (posttrain/recipes/demo_tools.py): its SFT demonstrations are token for token what the
rollout driver makes of the same turns, its SFT loss gives the tool output no gradient, and the whole pipeline
runs from the command line on a tiny setting."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.models import build_char_tokenizer, build_tiny_model
from posttrain.models.chat import stop_token_ids
from posttrain.recipes.demo_tools import (
    TOOLS_DEFAULTS,
    demonstration,
    masked_nll,
    sft_multiturn,
    tool_call_text,
    tools_config,
)
from posttrain.rollout.env import EnvContext, env_factory
from posttrain.rollout.multiturn import EpisodeDriver
from posttrain.tasks import build_task
from tests.conftest import TINY_MODEL
from tests.rollout.test_tools_env import scripted

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def setting(tmp_path):
    cfg = tools_config(None, [f"output_dir={tmp_path / 'run'}", "progress=false", "threads=1", "task.num_eval=10",
                              "sft.steps=3", "sft.batch_size=4", "sft.log_every=1"])
    tok = build_char_tokenizer()
    task = build_task(cfg.task, cfg.seed)
    return cfg, tok, task


def test_demonstrations_equal_the_driver_s_encoding(setting):
    cfg, tok, task = setting
    problems = task.train_problems[:4]
    turns = {p.prompt: ([tool_call_text(p), p.answer] if i % 2 == 0 else [p.answer]) for i, p in enumerate(problems)}
    make_env = env_factory(EnvContext(cfg.env, task, tok, False))
    driver = EpisodeDriver(make_env, tok, False, stop_token_ids(tok), cfg.rl.max_new_tokens, cfg.env.max_turns,
                           cfg.env.max_tool_calls, cfg.env.max_response_tokens, cfg.env.max_observation_chars, {})
    batch = driver.rollout(scripted(tok, turns), problems)
    for i, p in enumerate(problems):
        prompt, ids, loss = demonstration(make_env(), tok, False, p, turns[p.prompt], cfg.env.max_observation_chars)
        n = int(batch.response_mask[i].sum())
        assert prompt == batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        assert ids == batch.response_ids[i, :n].tolist()
        assert loss == batch.loss_mask[i, :n].tolist()
        assert batch.trajectories[i]["answer"] == p.answer
    text = tok.decode(demonstration(make_env(), tok, False, problems[0], turns[problems[0].prompt], 100)[1])
    a, b = problems[0].prompt.rsplit("\n", 1)[-1].removesuffix("=").split("*")
    assert text == (f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a}*{b}"}}}}</tool_call><eos>'
                    f"tool: {int(a) * int(b)}\n{int(a) * int(b)}<eos>")


def test_sft_gives_the_tool_output_no_gradient(setting):
    """Changing the tool output tokens of a demonstration changes the loss's gradient only through the context
    they give later tokens, never as targets: with the answer turn cut off, the gradient does not depend on them."""
    cfg, tok, task = setting
    p = task.train_problems[0]
    prompt, ids, loss = demonstration(env_factory(EnvContext(cfg.env, task, tok, False))(), tok, False, p,
                                      [tool_call_text(p), p.answer], cfg.env.max_observation_chars)
    first_obs = loss.index(0.0)
    end_obs = first_obs + loss[first_obs:].index(1.0)
    row = (prompt, ids[:end_obs], loss[:end_obs])  # the call turn, then the tool output, no answer after it
    changed = list(row[1])
    changed[first_obs:end_obs] = tok("tool: 99999\n", add_special_tokens=False)["input_ids"][:end_obs - first_obs]
    grads = []
    for response in (row[1], changed):
        model = build_tiny_model(cfg.model.model_copy(update=TINY_MODEL), tok, seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        one = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"steps": 1, "batch_size": 1, "warmup_steps": 0})})
        sft_multiturn(one, model, tok, [(row[0], response, row[2])], type("L", (), {"log": lambda s, r: None})(), "t")
        grads.append(torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_split_forward_equals_one_padded_forward(setting):
    """The SFT step's two forwards (short rows, long rows) give the loss and gradient of one padded forward."""
    cfg, tok, task = setting
    make_env = env_factory(EnvContext(cfg.env, task, tok, False))
    rows = [demonstration(make_env(), tok, False, p, [tool_call_text(p), p.answer] if i % 3 == 0 else [p.answer],
                          cfg.env.max_observation_chars) for i, p in enumerate(task.train_problems[:6])]
    n = sum(sum(m) for _, _, m in rows)
    model = build_tiny_model(cfg.model.model_copy(update=TINY_MODEL), tok, seed=0)
    results = []
    for groups in ([rows], [rows[1:3] + rows[4:], [rows[0], rows[3]]]):
        model.zero_grad()
        loss = sum(masked_nll(model, g, tok.pad_token_id, n) for g in groups)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_shipped_config_is_the_embedded_default():
    shipped = yaml.safe_load((ROOT / "configs" / "demo_tools.yaml").read_text())
    assert tools_config(shipped, []) == tools_config(None, [])
    # every default but output_dir, which the file leaves to the command (tests/test_run_lock.py)
    assert shipped == {k: v for k, v in json.loads(json.dumps(TOOLS_DEFAULTS)).items() if k != "output_dir"}


@pytest.mark.slow
def test_demo_pipeline_tools_runs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tools"
    rc = main(["demo", "--pipeline", "tools", "--output-dir", str(out), "progress=false", "threads=1",
               "task.num_eval=8", "task.max_operand=130", "sft.steps=2", "sft.batch_size=4", "rl.steps=1", "rl.prompts_per_step=2",
               "rl.group_size=2", "rl.max_new_tokens=20", "eval.max_new_tokens=20", "rl.eval_every=0"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    for key in ("no_tools_accuracy", "sft_accuracy", "sft_tool_call_rate", "rl_accuracy", "rl_tool_call_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    phases = {json.loads(line).get("phase") for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"sft_no_tools", "sft", "rl"} <= phases
    assert (out / "final" / "config.json").is_file()
