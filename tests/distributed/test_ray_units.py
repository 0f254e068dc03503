"""The pieces of backend ray that run without Ray, in this process:

- the Ray layout in one process (a policy copy per worker, weights synced by sha256) with one share equals
  backend local (the rollout worker generating with the learner's own policy) exactly;
- a learner's minibatch shares (GlobalShare) sum to the single-process gradient of the whole minibatch, for
  every aggregation mode;
- the reward metrics of the shares merge into the whole batch's; seeds, checksums, the temporary directory.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from posttrain.distributed.cluster import MAX_TEMP_DIR, ray_temp_dir
from posttrain.rollout.engines import shard_seed, state_dict_sha256
from posttrain.models import load_policy
from posttrain.rl.learner import GlobalShare, Learner, actor_backward
from posttrain.rl.loop import RLRun, make_experience, train_rl
from posttrain.rl.roles import InlineRoles, split_even
from posttrain.rl.workers import merge_breakdowns
from posttrain.train.optim import PhaseTimer
from posttrain.rewards.base import RewardBreakdown, reward_metrics
from posttrain.tasks import ArithmeticTask


def start(cfg):
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
    return model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)


class Rows:
    def __init__(self):
        self.rows = []

    def log(self, record):
        self.rows.append(record)


def test_shard_seeds_are_stable_and_distinct():
    seeds = {shard_seed(0, step, r, s) for step in range(1, 4) for r in range(2) for s in range(3)}
    assert len(seeds) == 18 and all(0 <= x < 2**63 for x in seeds)
    assert shard_seed(0, 1, 0, 0) == shard_seed(0, 1, 0, 0) != shard_seed(1, 1, 0, 0)


def test_checksum_sees_every_byte(tiny_model):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sha = state_dict_sha256(sd)
    assert sha == state_dict_sha256({k: v.clone() for k, v in reversed(list(sd.items()))})
    name = next(iter(sd))
    sd[name].view(-1)[0] = torch.nextafter(sd[name].view(-1)[0], torch.tensor(math.inf))
    assert state_dict_sha256(sd) != sha


def test_temporary_directory_in_the_output_dir_or_a_short_one(tmp_path):
    short_out = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))  # /tmp/pt-XXXXXXXX/ray: short enough
    try:
        inside, fallback = ray_temp_dir(short_out)
        assert not fallback and inside == short_out / "ray" and inside.is_dir()
    finally:
        shutil.rmtree(short_out)
    deep = tmp_path / ("d" * 80)
    outside, fallback = ray_temp_dir(deep)
    try:
        assert fallback and outside.is_dir() and str(outside).startswith("/tmp/posttrain-ray-")
        assert len(str(outside)) <= MAX_TEMP_DIR and not deep.exists()
    finally:
        outside.rmdir()


def test_split_is_contiguous_and_even():
    assert split_even(list(range(16)), 2) == [list(range(8)), list(range(8, 16))]
    assert [len(p) for p in split_even(list(range(5)), 3)] == [2, 2, 1]


@pytest.mark.parametrize("overrides", [
    ["rl.kl_coef=0.1"],
    ["rl.advantage=gae", "rl.kl_placement=reward", "rl.kl_estimator=k1", "rl.whiten_advantages=true"],
    ["rl.advantage=remax", "rl.kl_coef=0"],
], ids=["grpo", "ppo-critic", "remax-baseline"])
def test_one_share_gives_the_local_loops_experience_exactly(tmp_path, ray_config, sft_model_dir, overrides):
    cfg = ray_config(tmp_path, sft_model_dir, "ray.num_rollout_workers=1", "ray.num_learners=1", *overrides)
    metrics = assert_same_experience(cfg)
    assert 0 < metrics["reward_mean"] < 1  # mixed rewards: the advantages are not all zero


def test_reward_model_scoring_on_the_reward_workers_is_the_local_loops(tmp_path, ray_config, sft_model_dir):
    from posttrain.models.reward import RewardModel
    from posttrain.models.value import _head, scalar_model_from_pretrained

    model, tokenizer = load_policy(ray_config(tmp_path, sft_model_dir).model)
    rm = RewardModel(scalar_model_from_pretrained(sft_model_dir, tokenizer.pad_token_id), tokenizer)
    with torch.no_grad():
        _head(rm.model).weight.normal_(generator=torch.Generator().manual_seed(1))
    rm.set_normalization(0.25, 2.0)
    path = rm.save(tmp_path / "rm")
    cfg = ray_config(tmp_path, sft_model_dir, "ray.num_rollout_workers=1", "ray.num_learners=1", "rl.advantage=gae",
                     "rl.reward=reward_model", f"rl.reward_model_path={path}", "rl.kl_placement=reward")
    metrics = assert_same_experience(cfg)
    assert {"gold_score", "rm_score_mean", "values_mean"} <= set(metrics)


def assert_same_experience(cfg) -> dict:
    """One step's experience of backend local (the learner's own policy generates) and of the Ray layout in this
    process with one rollout worker and one learner (a policy copy, weights synced): every tensor and metric
    equal. Returns the metrics."""
    out = []
    for make_roles in (InlineRoles.local, InlineRoles.like_ray):
        model, tokenizer, task = start(cfg)
        torch.set_num_threads(cfg.ray.threads_per_worker)
        run = RLRun.create(cfg, make_roles(cfg, model, tokenizer, task), task)
        out.append(make_experience(run, 1, PhaseTimer()))
    (local, local_record, local_metrics), (ray_like, record, metrics) = out
    for name in local.__dataclass_fields__:
        a, b = getattr(local, name), getattr(ray_like, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert metrics == local_metrics and record == local_record
    return metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_shares_sum_to_the_single_process_gradient(tmp_path, ray_config, sft_model_dir, agg):
    cfg = ray_config(tmp_path, sft_model_dir, f"rl.loss_agg={agg}", "rl.micro_batch_size=4")
    model, tokenizer, task = start(cfg)
    run = RLRun.local(cfg, model, tokenizer, task)
    exp, _, _ = make_experience(run, 1, PhaseTimer())
    state = run.learner
    with torch.no_grad():  # off-policy by a little, so the ratio and the clipping take part
        for p in state.policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state.optimizer.zero_grad(set_to_none=True)
    full = actor_backward(cfg, state, exp)
    expected = {n: p.grad.clone() for n, p in state.policy.named_parameters()}
    state.optimizer.zero_grad(set_to_none=True)
    learner = Learner(cfg, model, tokenizer, task, [0, 1], 2)  # the same (moved) policy object
    shares = learner.gradients(exp)
    worst = max((p.grad - expected[n]).abs().max().item() for n, p in learner.state.policy.named_parameters())
    assert worst <= 1e-6, worst
    assert sum(s["loss"] for s in shares) == pytest.approx(full["loss"], abs=1e-6)
    assert len(GlobalShare(exp, 1, 2)) == len(exp) // 2 and GlobalShare(exp, 1, 2).num_tokens == exp.num_tokens


def test_reward_metrics_of_the_shares_merge_into_the_whole_batchs():
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0]
    components = {"correct": [1.0, 0.0, None, 1.0, 0.0], "format": [None, None, 0.5, None, None]}
    errors_per_row = [{"correct": 0, "format": 0}, {"correct": 1, "format": 0}, {"correct": 0, "format": 1},
                      {"correct": 0, "format": 0}, {"correct": 0, "format": 0}]

    def part(rows):
        comps = {k: [v[i] for i in rows] for k, v in components.items()}
        errs = {k: sum(errors_per_row[i][k] for i in rows) for k in components}
        return RewardBreakdown([rewards[i] for i in rows], comps, errs, reward_metrics([rewards[i] for i in rows], comps, errs))

    whole = part(range(5)).metrics
    assert merge_breakdowns([part([0, 1]), part([2, 3, 4])]) == whole
    assert merge_breakdowns([None, None]) == {}


@pytest.mark.parametrize("overrides", [
    ["rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=2", "rl.mask_truncated=true"],
    ["rl.advantage=gae", "rl.kl_placement=reward", "rl.mini_batches=2", "rl.ppo_epochs=2", "rl.kl_target=1.0"],
    ["rl.ptx_coef=0.1", "rl.ptx_batch_size=4"],
], ids=["dapo", "ppo", "ptx"])
def test_two_learner_shares_train_like_one(tmp_path, ray_config, sft_model_dir, overrides):
    """Inline runs of 2 steps: the same loop with 1 and with 2 learner shares gives the same metrics (to float
    rounding: the shares' gradients are summed in a different order) and weights."""
    runs = []
    for learners in (1, 2):
        cfg = ray_config(tmp_path, sft_model_dir, "rl.steps=2", f"ray.num_learners={learners}", *overrides)
        model, tokenizer, task = start(cfg)
        logger = Rows()
        train_rl(cfg, InlineRoles.like_ray(cfg, model, tokenizer, task), task, logger)
        runs.append((logger.rows, model.state_dict()))
    (rows_1, weights_1), (rows_2, weights_2) = runs
    for a, b in zip(rows_1, rows_2, strict=True):
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith(("time/", "tokens_per_s", "ratio_max")):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert max((weights_1[k] - weights_2[k]).abs().max().item() for k in weights_1) < 1e-5


def test_a_resumed_run_continues_exactly(tmp_path, ray_config, sft_model_dir):
    """Checkpoints of the distributed loop (rank 0's optimizer, this process's prompt order) resume exactly:
    steps 3-4 after resuming from step 2 equal steps 3-4 of the uninterrupted run."""
    from posttrain.train.checkpoint import checkpoint_root, load_checkpoint
    from posttrain.train.metrics import MetricsLogger
    from posttrain.train.control import Resumed, RunControl

    def run(out, resumed=None):
        cfg = ray_config(out, sft_model_dir, "rl.steps=4", "checkpoint.every=2", "checkpoint.keep=5")
        model, tokenizer, task = start(cfg)
        with MetricsLogger(out / "metrics.jsonl") as logger:
            ctl = RunControl.for_run(cfg, out, logger, resumed)
            train_rl(cfg, InlineRoles.like_ray(cfg, model, tokenizer, task), task, logger, ctl=ctl)
        volatile = ("time/", "tokens_per_s")
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith(volatile)}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, model.state_dict()

    (tmp_path / "a").mkdir()
    rows, weights = run(tmp_path / "a")
    path = sorted(checkpoint_root(tmp_path / "a").iterdir())[0]
    manifest, ck_weights, state = load_checkpoint(path)
    assert (manifest["phase"], manifest["step"]) == ("rl", 2)
    (tmp_path / "b").mkdir()
    resumed_rows, resumed_weights = run(tmp_path / "b", Resumed("rl", 2, ck_weights, state, path))
    assert resumed_rows == rows[2:]
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


def test_an_actor_whose_constructor_raised_reports_the_posttrain_error():
    from posttrain.distributed.pool import _init_error
    from posttrain.errors import ConfigError, WorkerError

    remote = ("The actor died because of an error raised in its creation task, \x1b[36mray::RolloutWorker.__init__()"
              "\x1b[39m (pid=1, ip=1.2.3.4)\n  File \"x.py\", line 8, in __init__\nposttrain.errors.ConfigError: "
              "ray.engine 'vllm' needs vLLM on the rollout workers: pip install 'posttrain[vllm]'")
    err = _init_error("rollout worker 0 (pid 1)", Exception(remote))
    assert isinstance(err, ConfigError)
    assert str(err) == "rollout worker 0 (pid 1): ray.engine 'vllm' needs vLLM on the rollout workers: pip install " \
                       "'posttrain[vllm]'"
    other = _init_error("reward worker 0", Exception("...\nKeyError: 'x'"))
    assert isinstance(other, WorkerError) and str(other) == "reward worker 0 could not start: KeyError: 'x'"


def test_worker_lost_keeps_its_fields_through_pickle():
    """WorkerLost carries the dead worker's role and index (the restart log uses them); Ray pickles exceptions."""
    import pickle

    from posttrain.errors import WorkerError, WorkerLost

    err = pickle.loads(pickle.dumps(WorkerLost("learner rank", 1, "learner rank 1 (pid 5)", "update", "killed")))
    assert isinstance(err, WorkerError) and (err.role, err.worker, err.method) == ("learner rank", 1, "update")
    assert str(err) == ("learner rank 1 (pid 5) died during update (killed); the run stops (continue from the last "
                        "checkpoint with --resume)")
