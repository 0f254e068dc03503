"""The self-reflection environment (posttrain/rollout/reflection.py): attempts, feedback, the reward and its
discount; and the reward worker taking an environment's reward instead of the verifier's."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import EnvConfig
from posttrain.errors import ConfigError
from posttrain.rl.workers import RewardWorker
from posttrain.rollout.env import EnvContext
from posttrain.rollout.multiturn import EpisodeDriver
from posttrain.rollout.reflection import FEEDBACK, Reflection
from posttrain.tasks import ArithmeticTask
from tests.rollout.helpers import Recorder, likely_to_stop


def env(task, **cfg):
    return Reflection(EnvContext(EnvConfig(name="reflection", **cfg), task, None, False))


@pytest.fixture
def task(make_config, tmp_path):
    return ArithmeticTask(make_config(tmp_path).task, 0)


def test_a_right_first_answer_ends_with_its_score(task):
    p = task.train_problems[0]
    e = env(task)
    assert e.reset(p) == p.prompt
    obs = e.step(p.answer)
    assert obs.done and obs.reward == 1.0 and obs.messages == [] and obs.info["attempt"] == 1


def test_a_wrong_answer_gets_the_feedback_until_max_attempts(task):
    p = task.train_problems[0]
    e = env(task, max_attempts=3)
    e.reset(p)
    for attempt in (1, 2):
        obs = e.step("nonsense")
        assert not obs.done and obs.reward is None
        assert obs.messages == [{"role": "user", "content": FEEDBACK}] and obs.info["correct"] is False
        assert obs.info["attempt"] == attempt
    last = e.step("still wrong")
    assert last.done and last.reward == 0.0 and last.info["attempt"] == 3
    e.reset(task.train_problems[1])  # a fresh trajectory starts counting again
    assert not e.step("nonsense").done


def test_the_reward_is_the_final_attempt_discounted_per_extra_attempt(task):
    p = task.train_problems[0]
    e = env(task, max_attempts=3, attempt_discount=0.5)
    e.reset(p)
    e.step("wrong")
    e.step("wrong again")
    obs = e.step(p.answer)
    assert obs.done and obs.reward == pytest.approx(0.25)  # 1.0 * 0.5 ** 2
    e.reset(p)
    assert e.step(p.answer).reward == 1.0  # at the first attempt, no discount


def test_threshold_and_feedback_come_from_kwargs_and_the_task_is_required(task):
    ctx = EnvContext(EnvConfig(name="reflection"), task, None, False)
    e = Reflection(ctx, feedback="again", threshold=2.0)  # a right answer (1.0) is below the threshold
    e.reset(task.train_problems[0])
    obs = e.step(task.train_problems[0].answer)
    assert not obs.done and obs.messages[0]["content"] == "again"
    with pytest.raises(ConfigError, match="env.kwargs.feedback must be a string"):
        Reflection(ctx, feedback=False)  # env.kwargs={feedback: no} in YAML
    with pytest.raises(ConfigError, match="needs the run's task"):
        Reflection(EnvContext(EnvConfig(name="reflection"), None, None, False))


def test_reflection_trajectories_score_with_the_environment_reward(make_config, tiny_model, tokenizer, tmp_path,
                                                                   task):
    likely_to_stop(tiny_model, tokenizer.eos_token_id)
    cfg = make_config(tmp_path, "env.name=reflection", "env.kwargs={feedback: wrong}", "rl.max_new_tokens=5",
                      "env.attempt_discount=0.5")
    problems = task.train_problems[:8]
    recorder = Recorder(tiny_model)
    batch = EpisodeDriver.from_config(cfg, tokenizer, task).rollout(recorder, problems,
                                                                    generator=torch.Generator().manual_seed(0))
    many = [t for t in batch.trajectories if t["turns"] > 1]
    assert many, "the test needs trajectories with a second attempt"
    for t in batch.trajectories:  # each attempt but the last was wrong; a finished one has the env's reward
        assert [s["correct"] for s in t["steps"][:-1]] == [False] * (len(t["steps"]) - 1)
        assert (t["reward"] is not None) == t["finished"]
    envs = [t for t in batch.trajectories if t["finished"]]
    assert envs and all(t["reward"] == t["steps"][-1]["score"] * 0.5 ** (t["turns"] - 1) for t in envs)
    # the reward worker takes the environment's reward where there is one, the verifier's on the answer otherwise
    batch.trajectories[0]["reward"] = 0.75
    batch.trajectories[1]["reward"], batch.trajectories[1]["answer"] = None, problems[1].answer
    scores = RewardWorker(cfg, tokenizer, task).score(problems, batch)
    assert scores.gold[0] == 0.75 and scores.gold[1] == 1.0 and scores.breakdown is None
    expected = [t["reward"] if t["reward"] is not None else float(t["answer"].strip() == p.answer)
                for t, p in zip(batch.trajectories, problems)]
    assert scores.gold.tolist() == expected
