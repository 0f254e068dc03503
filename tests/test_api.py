"""The Python API (posttrain/api.py), the custom task with reward functions by name, and `posttrain eval`.

Runs use `stand_in` (a tiny random Llama with SmolLM2's tokenizer and chat template) and a few steps: what is
checked is the plumbing (the same numbers from the API and from a YAML config, columns reaching the rewards,
errors before any model loads), not learning; the README's example is the learning check (its numbers are in
the closing note of issue 19)."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import yaml

import posttrain
from posttrain.cli import main
from posttrain.errors import ConfigError, DataError
from posttrain.recipes.evaluate import majority_vote
from posttrain.rewards.resolve import inline_spec, resolve_reward, resolve_rewards

pytestmark = pytest.mark.slow  # a few tiny runs of a 49k-vocabulary model: tens of seconds

REWARDS = textwrap.dedent('''
    def short(prompts, completions, answer, **_):
        """1 when the completion is at most as long as the column `answer` says."""
        return [float(len(c) <= int(a)) for c, a in zip(completions, answer)]

    def seen(prompts, completions, **columns):
        """Records the columns it was given (for the test) and scores 0."""
        seen.calls.append(sorted(columns))
        return [0.0] * len(completions)
    seen.calls = []

    def needs_gold(prompts, completions, gold):
        return [0.0] * len(completions)

    def factory(limit, bonus=0.5):
        def capped(prompts, completions, **_):
            return [bonus if len(c) <= limit else 0.0 for c in completions]
        return capped

    NOT_CALLABLE = 3
''')
ROWS = [{"prompt": f"Count to {n}.", "answer": str(10 + n), "topic": "counting"} for n in range(24)]
TINY = {"threads": 1, "progress": False, "overrides": {"model.dtype": "float32"},
        "task": {"num_eval": 4}, "eval": {"batch_size": 4, "max_new_tokens": 6},
        "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "eval_every": 1,
               "lr": 1e-3, "warmup_steps": 0}}


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's working directory with my_rewards.py and train.jsonl, as the README's example has."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def steady(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock values."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in ("tokens_per_s", "wall_seconds")}
            for r in records]


def test_the_api_and_a_yaml_config_give_the_same_run(user_dir, stand_in):
    from my_rewards import short

    res = posttrain.fit("grpo", model=stand_in, dataset=ROWS, reward_funcs=[short], output_dir="api_run",
                          **TINY)
    assert res.summary["eval_problems"] == 4 and 0.0 <= res.summary["rl_accuracy"] <= 1.0
    assert (user_dir / "api_run" / "data" / "train.jsonl").is_file()  # rows given in memory are a file
    saved = yaml.safe_load((user_dir / "api_run" / "config.yaml").read_text())
    assert saved["task"]["name"] == "custom" and saved["rl"]["reward_funcs"] == ["my_rewards:short"]
    config = {**{k: v for k, v in TINY.items() if k != "overrides"},
              "task": {**TINY["task"], "name": "custom", "path": "train.jsonl"},
              "rl": {**TINY["rl"], "preset": "grpo", "reward_funcs": ["my_rewards:short"]},
              "model": {"path": str(stand_in), "dtype": "float32"}}
    (user_dir / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["rl", "run.yaml", "output_dir=cli_run"]) == 0
    cli = json.loads((user_dir / "cli_run" / "summary.json").read_text())
    assert cli["rl_accuracy"] == res.summary["rl_accuracy"]
    from posttrain.train.metrics import read_metrics

    assert steady(read_metrics(user_dir / "cli_run" / "metrics.jsonl")) == steady(res.metrics)
    assert any("reward/short" in r for r in res.metrics)  # the function's own metric, by its name


def test_columns_reach_the_reward_functions_by_name(user_dir, stand_in):
    import my_rewards

    my_rewards.seen.calls.clear()
    posttrain.fit("rl", model=stand_in, dataset="train.jsonl", reward_funcs=[my_rewards.seen],
                    output_dir="run", **{**TINY, "rl": {**TINY["rl"], "steps": 1}})
    assert my_rewards.seen.calls and all(c == ["answer", "topic"] for c in my_rewards.seen.calls)


def test_a_lambda_is_named_inline_and_resolves_in_this_process_only(user_dir):
    fn = lambda prompts, completions, **_: [1.0] * len(completions)  # noqa: E731
    spec = inline_spec(fn)
    assert spec.startswith("inline:") and resolve_reward(spec) is fn
    with pytest.raises(ConfigError, match="another process"):
        resolve_reward("inline:never_registered")


def test_reward_specs_factories_files_and_their_errors(user_dir):
    capped = resolve_reward("my_rewards:factory(3, bonus=2.0)")
    assert capped(["p"] * 2, ["ab", "abcd"]) == [2.0, 0.0]
    assert resolve_reward("posttrain.rewards:tag_format_reward(answer)").__name__ == "answer_tag_format"
    assert resolve_reward(f"{user_dir / 'my_rewards.py'}:short")(["p"], ["x"], answer=["5"]) == [1.0]
    rs = resolve_rewards(["my_rewards:short", "my_rewards:factory(2)"], [1.0, 0.1])
    assert rs.weights == {"short": 1.0, "capped": 0.1}
    for spec, message in (("nomodule:fn", "no module named 'nomodule'"), ("my_rewards:nope", "has no 'nope'"),
                          ("my_rewards:NOT_CALLABLE", "not a reward function"), ("my_rewards", "not 'module:function'"),
                          ("my_rewards:factory(x + 1)", "must be literals"), ("missing.py:f", "no such file")):
        with pytest.raises(ConfigError, match=message):
            resolve_reward(spec)
    with pytest.raises(ConfigError, match="a function of the Python script that started that run"):
        resolve_reward("__main__:a_function_of_some_other_script")
    with pytest.raises(ConfigError, match="2 values for 1"):
        resolve_rewards(["my_rewards:short"], [1.0, 2.0])


@pytest.mark.parametrize("overrides,message", [
    (["rl.reward_funcs=[my_rewards:needs_gold]"], "reward needs_gold needs the column 'gold', which train.jsonl"),
    (["rl.reward_funcs=[]"], "task custom has no reward of its own"),
    (["rl.reward_funcs=[nomodule:fn]"], "rl.reward_funcs\\[0\\]: no module named 'nomodule'"),
])
def test_reward_errors_are_one_line_before_any_model_loads(overrides, message, user_dir, stand_in, monkeypatch,
                                                           capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("posttrain.train.run.load_policy", no_model)
    (user_dir / "c.yaml").write_text(yaml.safe_dump({"task": {"name": "custom", "path": "train.jsonl", "num_eval": 4},
                                                     "rl": {"reward_funcs": ["my_rewards:short"]}}))
    assert main(["rl", "c.yaml", f"model.path={stand_in}", "output_dir=out", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (user_dir / "out").exists()


def test_messages_rows_go_through_the_chat_template_and_sft_learns_the_assistant_turn(user_dir, stand_in):
    from transformers import AutoTokenizer

    from posttrain.config import TaskConfig
    from posttrain.tasks import build_task

    rows = [{"messages": [{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": str(n)}],
             "answer": str(n)} for n in range(12)]
    (user_dir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task(TaskConfig(name="custom", path="chat.jsonl", num_eval=2), 0, ("my_rewards:short",))
    problem = task.train_problems[0]
    assert problem.messages[-1]["role"] == "user" and task.demonstration(problem, None) == problem.completion
    res = posttrain.fit("sft", model={"path": str(stand_in), "dtype": "float32"}, dataset="chat.jsonl", reward_funcs=["my_rewards:short"],
                          output_dir="sft_run", task={"num_eval": 2}, sft={"steps": 2, "batch_size": 2,
                                                                           "eval_every": 0},
                          threads=1, progress=False, eval={"max_new_tokens": 4})
    assert "sft_accuracy" in res.summary
    tok = AutoTokenizer.from_pretrained(stand_in)
    from posttrain.models.chat import render_prompt

    rendered = render_prompt(tok, list(problem.messages))
    assert rendered.endswith("<|im_start|>assistant\n") and "Say" in rendered


def test_bad_rows_and_arguments(user_dir):
    from posttrain.config import TaskConfig
    from posttrain.tasks import build_task

    (user_dir / "bad.jsonl").write_text('{"question": "no prompt"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: missing field 'prompt'"):
        build_task(TaskConfig(name="custom", path="bad.jsonl", num_eval=1), 0, ("my_rewards:short",))
    with pytest.raises(DataError, match="task custom has no data"):
        build_task(TaskConfig(name="custom"), 0, ("my_rewards:short",))
    with pytest.raises(ConfigError, match="unexpected argument 'rll'.*did you mean 'rl'"):
        posttrain.fit("rl", rll={"steps": 1})
    with pytest.raises(ConfigError, match="unknown command 'grpoo'"):
        posttrain.fit("grpoo")
    with pytest.raises(ConfigError, match="dataset\\[1\\]: expected a dict"):
        posttrain.fit("rl", dataset=[{"prompt": "a"}, "b"], reward_funcs=["my_rewards:short"])


def test_builtin_task_columns_reach_a_reward_named_in_the_config(tmp_path, make_config):
    from posttrain.tasks import build_task

    cfg = make_config(tmp_path)
    task = build_task(cfg.task, 0, ("posttrain.rewards:math_reward",))
    p = task.eval_problems[0]
    assert task.reward([p.prompt], [p.answer], [p]) == [1.0]  # arithmetic's `answer` column, checked by math_reward


def test_majority_vote():
    assert majority_vote(["4", "5", "4"], [1.0, 0.0, 1.0]) == 1.0
    assert majority_vote(["5", "4"], [0.0, 1.0]) == 0.0  # a tie goes to the answer seen first


def test_eval_reproduces_the_runs_held_out_accuracy(tmp_path, make_config, capsys):
    cfg = make_config(tmp_path / "run", "rl.steps=2")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["demo", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run" / "final"), "--samples", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["greedy_accuracy"] == summary["rl_accuracy"]
    assert set(result["pass_at_k"]) == {"1", "2"} and result["pass_at_k"]["1"] <= result["pass_at_k"]["2"]
    assert 0.0 <= result["majority_vote_accuracy"] <= 1.0
    assert "greedy accuracy" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing")]) == 2
