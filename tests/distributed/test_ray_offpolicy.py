"""Off-policy rollouts on a local Ray instance (`ray.max_staleness=1`, 2 CPUs; one Ray session for the module):

1. GRPO for 4 steps, 2 rollout workers, 1 reward worker, 2 gloo learner ranks: the rollout workers generate step
   t+1's batch while the ranks train on step t. Every step's lag is within the bound (0, 1, 1, 1), and the
   metrics and final weights equal the single-process run (InlineRoles.like_ray, where the same calls run one
   after the other) exactly.
2. `posttrain rl` with a learner rank SIGKILLed while step 3's batch is generated, i.e. during step 2's update:
   every role restarts, the run resumes from the step-1 checkpoint, which holds step 2's batch (sampled ahead
   by the weights of version 0), and ends with the single-process run's metrics and weights, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray")

from posttrain.cli import main  # noqa: E402
from posttrain.config import dump_config  # noqa: E402
from posttrain.distributed.cluster import start_ray_cluster  # noqa: E402
from posttrain.rl.loop import train_rl  # noqa: E402
from tests.distributed.test_ray_cluster import (Env, Rows, inline_run, kill_when_step_generates,  # noqa: E402
                                                start, steady)

pytestmark = pytest.mark.slow

OFF = ["rl.steps=4", "ray.max_staleness=1", "rl.rollout_correction=tis"]


@pytest.fixture(scope="module")
def env(ray_config, sft_model_dir):
    e = Env(lambda out, model_dir: ray_config(out, model_dir, *OFF), sft_model_dir)
    yield e
    e.close()


def test_off_policy_ray_run_equals_the_single_process_run(env):
    cfg = env.cfg
    model, tokenizer, task = start(cfg)
    cluster = start_ray_cluster(cfg, model, tokenizer, task)
    try:
        logger = Rows()
        accuracy = train_rl(cfg, cluster, task, logger)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        cluster.shutdown()
    rows = logger.rows
    print("\nray, max_staleness 1: " + "; ".join(
        f"step {r['step']}: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in r.items() if k.startswith("time/"))
        for r in rows))
    assert [r["policy_lag"] for r in rows] == [0, 1, 1, 1]
    assert all(r["rollout_kl"] > 1e-6 for r in rows[1:])  # trained on another policy's samples, and measured
    expected, expected_accuracy, expected_weights = inline_run(cfg)
    assert steady(rows) == steady(expected) and accuracy == expected_accuracy
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert 0 < rows[0]["reward_mean"] < 1 and rows[-1]["grad_norm"] > 0


def test_a_dead_learner_rank_resumes_with_the_batch_sampled_ahead(env, tmp_path, capsys, monkeypatch):
    import posttrain.distributed.cluster as cluster_mod

    c = env.cfg
    cfg = c.model_copy(update={
        "output_dir": str(tmp_path / "run"), "rl": c.rl.model_copy(update={"steps": 3}),
        "checkpoint": c.checkpoint.model_copy(update={"every": 1}),
        "ray": c.ray.model_copy(update={"num_rollout_workers": 1, "num_learners": 2, "num_reward_workers": 0})})
    dump_config(cfg, tmp_path / "ray.yaml")
    real, killed = cluster_mod.start_ray_cluster, {}

    def start_and_arm(*args):
        cluster = real(*args)
        kill_when_step_generates(cluster, cfg, lambda: cluster.learners.pids[1], killed)  # step 3's: in step 2
        return cluster

    monkeypatch.setattr(cluster_mod, "start_ray_cluster", start_and_arm)
    code = main(["rl", str(tmp_path / "ray.yaml")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"learner rank 1 (pid {killed['pid']}) died during" in err, err
    assert "(rl step 1)" in err, err  # resumed from step 1's checkpoint: step 2's batch came from it
    run = tmp_path / "run"
    (restart,) = json.loads((run / "summary.json").read_text())["ray"]["restarts"]
    assert (restart["role"], restart["worker"], restart["resumed"]) == ("learner rank", 1, True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and [r["policy_lag"] for r in rows[1:]] == [0, 1, 1]
    expected_rows, accuracy, weights = inline_run(cfg)
    assert steady(rows[1:]) == steady(expected_rows) and rows[-1]["accuracy"] == accuracy
    from safetensors.torch import load_file

    saved = load_file(str(run / "final" / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], weights[k]) for k in saved)
