"""backend ray with a multi-turn environment: the rollout workers run the driver and the reflection environment
(building the task's verifier from the config in their own process); the run's metrics and weights equal the
single-process run with the same shares exactly."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from posttrain.distributed.cluster import ray_session, start_ray_cluster  # noqa: E402
from posttrain.rl.loop import train_rl  # noqa: E402
from tests.distributed.test_ray_cluster import Rows, inline_run, start, steady  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_reflection_run_on_ray_equals_the_single_process_run(ray_config, sft_model_dir):
    out = Path(tempfile.mkdtemp(prefix="pt-mt-", dir="/tmp"))
    try:
        cfg = ray_config(out, sft_model_dir, "rl.steps=2", "env.name=reflection", "env.kwargs={feedback: wrong}",
                         "env.max_attempts=3", "ray.num_reward_workers=0")
        with ray_session(cfg, out):
            model, tokenizer, task = start(cfg)
            cluster = start_ray_cluster(cfg, model, tokenizer, task)
            try:
                logger = Rows()
                accuracy = train_rl(cfg, cluster, task, logger)
            finally:
                cluster.shutdown()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        rows, inline_accuracy, inline_weights = inline_run(cfg)
        assert steady(logger.rows) == steady(rows) and accuracy == inline_accuracy
        assert all(torch.equal(weights[k], inline_weights[k]) for k in weights)
        assert any(r["env/turns"] > 1 for r in rows)  # the SFT model is wrong often enough to get feedback
    finally:
        shutil.rmtree(out, ignore_errors=True)
