"""Off-policy rollouts (`ray.max_staleness`, posttrain/rl/ahead.py) with the Ray layout in one process
(InlineRoles.like_ray: the run a Ray run is compared with), no Ray needed:

- every step's batch carries the policy version that generated it, and the lag is exactly the schedule
  0, 1, .., k, k, .. (never above k; always 0 on-policy); instrumented: the batch's rollout log-probs are those of
  the weights of the version it claims, recomputed from the synced weights, and its log pi_old those of the
  current weights;
- the loss weighs pi_old / pi_rollout (TIS) with exactly those log-probs, and the ratio invariant holds against
  the recomputed pi_old;
- a checkpoint holds the batch sampled ahead: a resumed run continues exactly;
- the config refuses what cannot work, in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import ConfigError, build_config
from posttrain.errors import PosttrainError
from posttrain.models import load_policy
from posttrain.models.logprobs import response_logprobs
from posttrain.rl.loop import RLRun, train_rl
from posttrain.rl.roles import InlineRoles
from posttrain.tasks import ArithmeticTask

OFF = ["rl.rollout_correction=tis", "rl.rollout_correction_cap=2.0"]


class Rows:
    def __init__(self):
        self.rows = []

    def log(self, record):
        self.rows.append(record)


def start(cfg):
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
    return model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)


def instrumented_run(cfg):
    """A like_ray run that records the weights of every policy version (at each sync) and every trained batch."""
    model, tokenizer, task = start(cfg)
    roles = InlineRoles.like_ray(cfg, model, tokenizer, task)
    versions = {roles.version: {k: v.clone() for k, v in roles.latest.items()}}
    trained = []
    sync, submit = roles.sync, roles.submit_update

    def recording_sync():
        sync()
        versions[roles.version] = {k: v.clone() for k, v in roles.latest.items()}

    def recording_submit(exp, kl_coef):
        trained.append((roles.updates, exp))
        return submit(exp, kl_coef)

    roles.sync, roles.submit_update = recording_sync, recording_submit
    logger = Rows()
    train_rl(cfg, roles, task, logger)
    return logger.rows, versions, trained, model, tokenizer


def logprobs_under(model, weights, exp, temperature):
    model.load_state_dict(weights)
    with torch.no_grad():
        out = response_logprobs(model, exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask,
                                temperature=temperature)[0]
    return out * exp.loss_mask


@pytest.mark.parametrize("k,lags", [(0, [0, 0, 0, 0]), (1, [0, 1, 1, 1]), (2, [0, 1, 2, 2])])
def test_each_batch_is_generated_by_the_version_it_records(tmp_path, ray_config, sft_model_dir, k, lags):
    cfg = ray_config(tmp_path, sft_model_dir, "rl.steps=4", f"ray.max_staleness={k}", *(OFF if k else []))
    rows, versions, trained, model, _ = instrumented_run(cfg)
    assert [r["policy_lag"] for r in rows] == lags and max(lags) <= k
    assert sorted(versions) == [0, 1, 2, 3, 4]
    for row, (version, exp) in zip(rows, trained, strict=True):
        assert version == row["step"] - 1  # step t trains the weights of t-1 updates
        behaviour = logprobs_under(model, versions[version - row["policy_lag"]], exp, cfg.rl.temperature)
        assert (behaviour - exp.rollout_logprobs).abs().max() < 1e-5  # made by the version it records
        current = logprobs_under(model, versions[version], exp, cfg.rl.temperature)
        if row["policy_lag"] > 0:
            assert (exp.old_logprobs - current).abs().max() < 1e-5  # log pi_old: recomputed, current weights
            assert (current - exp.rollout_logprobs).abs().max() > 1e-3  # and really another policy's
            assert row["rollout_kl"] > 1e-6
        assert row["first_log_ratio_max"] < 1e-4  # the ratio invariant, against the recomputed pi_old
        if k:  # TIS: the loss's weight is min(pi_old / pi_rollout, C) with exactly these log-probs
            m = exp.loss_mask
            w = torch.clamp(torch.exp(exp.old_logprobs - exp.rollout_logprobs), max=2.0)
            assert row["rollout_is_weight_mean"] == pytest.approx(float((w * m).sum() / m.sum()), rel=1e-5)


def test_on_policy_keeps_the_engines_log_probs(tmp_path, ray_config, sft_model_dir):
    """max_staleness 0 samples nothing ahead and keeps the engine's log-probs as log pi_old (no recompute, so the
    numbers are those of before the pipeline: the Ray tests compare them with the single-process run)."""
    cfg = ray_config(tmp_path, sft_model_dir, "rl.steps=3")
    rows, _, trained, _, _ = instrumented_run(cfg)
    assert all(torch.equal(exp.old_logprobs, exp.rollout_logprobs) for _, exp in trained)
    assert all(r["rollout_kl"] == 0.0 and r["policy_lag"] == 0 for r in rows)


def test_a_resumed_off_policy_run_continues_exactly(tmp_path, ray_config, sft_model_dir):
    """The step-2 checkpoint holds step 3's batch, sampled ahead with the weights of version 1: steps 3-4 after
    resuming from it equal steps 3-4 of the uninterrupted run, bit for bit."""
    from posttrain.train.checkpoint import checkpoint_root, load_checkpoint
    from posttrain.train.control import Resumed, RunControl
    from posttrain.train.metrics import MetricsLogger

    def run(out, resumed=None):
        cfg = ray_config(out, sft_model_dir, "rl.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
                         "ray.max_staleness=1", *OFF)
        model, tokenizer, task = start(cfg)
        with MetricsLogger(out / "metrics.jsonl") as logger:
            ctl = RunControl.for_run(cfg, out, logger, resumed)
            train_rl(cfg, InlineRoles.like_ray(cfg, model, tokenizer, task), task, logger, ctl=ctl)
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, model.state_dict()

    (tmp_path / "a").mkdir()
    rows, weights = run(tmp_path / "a")
    assert [r["policy_lag"] for r in rows] == [0, 1, 1, 1]
    path = min(checkpoint_root(tmp_path / "a").iterdir())
    manifest, ck_weights, state = load_checkpoint(path)
    assert (manifest["phase"], manifest["step"]) == ("rl", 2)
    (ahead,) = state["ahead"]  # the batch of step 3, made by version 1
    assert ahead["step"] == 3 and ahead["policy_version"].tolist() == [1] * 16 and state["policy_version"] == 2
    (tmp_path / "b").mkdir()
    resumed_rows, resumed_weights = run(tmp_path / "b", Resumed("rl", 2, ck_weights, state, path))
    assert resumed_rows == rows[2:]
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


def test_off_policy_with_dynamic_sampling_and_a_critic(tmp_path, ray_config, sft_model_dir):
    """What is sampled ahead is the whole sample phase (DAPO's rounds, ReMax's greedy baseline); PPO's values come
    from the critic at training time. Each runs with the lag schedule and learns something (gradients flow)."""
    for extra in (["rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=2"], ["rl.advantage=remax"],
                  ["rl.advantage=gae", "rl.mini_batches=2", "rl.ppo_epochs=2"]):
        cfg = ray_config(tmp_path, sft_model_dir, "rl.steps=3", "ray.max_staleness=1", *OFF, *extra)
        rows, _, _, _, _ = instrumented_run(cfg)
        assert [r["policy_lag"] for r in rows] == [0, 1, 1], extra
        assert all(r["grad_norm"] > 0 for r in rows), extra


@pytest.mark.parametrize("overrides,expected", [
    (["ray.max_staleness=1"], "ray.max_staleness=1 needs backend=ray"),
    (["backend=ray", "rl.prompts_per_step=4", "rl.group_size=4", "ray.max_staleness=1"],
     "ray.max_staleness=1 trains on samples of a policy up to 1 update(s) old: set rl.rollout_correction"),
    (["backend=ray", "ray.max_staleness=-1"], "ray.max_staleness"),
])
def test_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_roles_that_share_the_learners_policy_refuse_staleness(tmp_path, ray_config, sft_model_dir):
    cfg = ray_config(tmp_path, sft_model_dir, "ray.max_staleness=1", *OFF)
    model, tokenizer, task = start(cfg)
    with pytest.raises(ConfigError, match="needs rollout workers with their own weights"):
        RLRun.local(cfg, model, tokenizer, task)


def test_a_lag_outside_the_bound_is_an_invariant_error():
    from posttrain.errors import InvariantError
    from posttrain.rl.ahead import Rollouts, policy_lag

    rollouts = Rollouts(5, None, None, {}, None, torch.tensor([2, 2, 3]))
    assert policy_lag(4, rollouts, 2).tolist() == [2, 2, 1]
    with pytest.raises(InvariantError, match=r"step 5 .* versions \[2, 3\] .* version 5: lag 3 outside \[0, "
                                             r"ray.max_staleness=2\]"):
        policy_lag(5, rollouts, 2)
    with pytest.raises(InvariantError, match=r"version 1: lag -2 outside"):  # a version from the future: a negative lag
        policy_lag(1, rollouts, 2)


def test_the_checkpoint_state_of_a_queue_round_trips(tmp_path, ray_config, sft_model_dir):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it: every field, the problems as
    the task's own objects, per-row records (Trajectories) too."""
    import posttrain.batch
    from posttrain.rl.ahead import Rollouts, rollouts_from_state, rollouts_state
    from posttrain.rl.experience import ScoredRollouts

    cfg = ray_config(tmp_path, sft_model_dir)
    task = ArithmeticTask(cfg.task, cfg.seed)
    problems = task.train_problems[3:5]
    B, T = 2, 3
    extra = {}
    if hasattr(posttrain.batch, "Trajectories"):
        extra["trajectories"] = posttrain.batch.Trajectories([{"answer": "7", "turns": [1, 2]}, {"answer": None}])
    batch = posttrain.batch.RolloutBatch(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                                         torch.randint(0, 9, (B, T)), torch.ones(B, T), torch.randn(B, T),
                                         torch.tensor([True, False]), **extra)
    data = ScoredRollouts(batch, problems, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.zeros(B),
                          torch.zeros(B), {"reward/x": 0.5})
    queue = [Rollouts(7, data, data, {"ds_rounds": 2}, torch.tensor([0.5, 0.5]), torch.tensor([5, 5]))]
    torch.save({"ahead": rollouts_state(queue, task)}, tmp_path / "state.pt")
    (back,) = rollouts_from_state(torch.load(tmp_path / "state.pt", weights_only=True)["ahead"], task)
    assert back.step == 7 and back.metrics == {"ds_rounds": 2} and back.allgen is back.data
    assert back.data.problems[0] is problems[0] and back.data.problems[1] is problems[1]
    assert torch.equal(back.policy_version, torch.tensor([5, 5])) and torch.equal(back.baseline, queue[0].baseline)
    for f in ("prompt_ids", "response_ids", "response_mask", "rollout_logprobs", "old_logprobs", "finished"):
        assert torch.equal(getattr(back.data.batch, f), getattr(batch, f)), f
    if extra:
        assert type(back.data.batch.trajectories) is type(extra["trajectories"])
        assert list(back.data.batch.trajectories) == list(extra["trajectories"])
    stranger = ScoredRollouts(batch, [problems[0], object()], *(torch.zeros(B) for _ in range(4)))
    with pytest.raises(PosttrainError, match="not one of task.train_problems"):
        rollouts_state([Rollouts(1, stranger, stranger, {}, None, torch.zeros(B, dtype=torch.long))], task)
