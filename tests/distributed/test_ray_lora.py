"""backend ray with model.peft=lora on a local Ray instance (2 CPUs; one Ray session and one cluster for the module:
1 rollout worker, scoring in the driver, 2 gloo learner ranks, LoRA r=4 on the tiny SFT model):

1. GRPO for 3 steps (a checkpoint after each), the rollout worker killed (SIGKILL) while it generates step 3:
   a fresh worker (base model, adapter, then the adapter sync) finishes the run, and the metrics and the final
   adapter equal the single-process run (InlineRoles.like_ray) bit for bit; the adapter moved and the first
   minibatch's ratio is 1.
2. A sync sends the adapter alone: every tensor of the payload is a LoRA tensor, every adapter tensor is in it,
   and `ray/sync_bytes` is its size, several times smaller than a full sync's (the same model without LoRA).
3. The rollout worker's sha256 catches one flipped bit in the adapter on its way, and it refuses a payload that
   is not its adapter (a base weight added, a tensor left out).
4. Resuming from the step-1 checkpoint (roles.restore: the learner ranks load the adapter and its optimizer state,
   then a sync) gives steps 2-3 of the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("peft")

from posttrain.config import ConfigError, build_config  # noqa: E402
from posttrain.distributed.cluster import start_ray_cluster  # noqa: E402
from posttrain.errors import WorkerError  # noqa: E402
from posttrain.rl.loop import train_rl  # noqa: E402
from posttrain.rl.roles import InlineRoles, state_dict_bytes  # noqa: E402
from posttrain.train.checkpoint import checkpoint_root, load_checkpoint  # noqa: E402
from posttrain.train.control import Resumed, RunControl  # noqa: E402
from posttrain.train.metrics import MetricsLogger  # noqa: E402
from tests.distributed.test_ray_cluster import Env, Rows, kill_when_step_generates, start, steady  # noqa: E402

pytestmark = pytest.mark.slow

LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8"]
# 16 sequences a step: one rollout worker (one actor fewer than two), scored in the driver, two learner ranks
LAYOUT = ["rl.steps=3", "rl.lr=5e-3", "ray.num_rollout_workers=1", "ray.num_reward_workers=0", "ray.num_learners=2",
          "checkpoint.every=1", "checkpoint.keep=5"]


def logged_run(cfg, roles, task, out, resumed=None) -> list[dict]:
    """train_rl with checkpoints in `out` (resuming from `resumed`); the metrics rows it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    with MetricsLogger(out / "metrics.jsonl") as logger:
        train_rl(cfg, roles, task, logger, ctl=RunControl.for_run(cfg, out, logger, resumed))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def env(ray_config, sft_model_dir):
    e = Env(lambda out, model_dir: ray_config(out, model_dir, *LAYOUT, *LORA), sft_model_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def ray_run(env):
    cfg = env.cfg
    model, tokenizer, task = start(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cluster = start_ray_cluster(cfg, model, tokenizer, task)
    killed = {}
    kill_when_step_generates(cluster, cfg, lambda: cluster.rollout_workers.pids[0], killed)
    rows = logged_run(cfg, cluster, task, env.out / "run")
    yield {"cluster": cluster, "rows": rows, "model": model, "task": task, "initial": initial,
           "adapter": adapter(model), "weights": {k: v.clone() for k, v in model.state_dict().items()},
           "killed": killed, "restarts": list(cluster.budget.log), "pids": list(cluster.rollout_workers.pids)}
    cluster.shutdown()


def test_ray_with_lora_equals_the_single_process_run(ray_run, env):
    model, tokenizer, task = start(env.cfg)
    logger = Rows()
    train_rl(env.cfg, InlineRoles.like_ray(env.cfg, model, tokenizer, task), task, logger)
    assert steady(ray_run["rows"]) == steady(logger.rows)  # every metric, ray/sync_bytes included
    expected = adapter(model)
    assert set(ray_run["adapter"]) == set(expected) and all(".lora_" in n for n in expected)
    assert all(torch.equal(ray_run["adapter"][n], expected[n]) for n in expected)
    initial, final = ray_run["initial"], ray_run["weights"]
    assert all(torch.equal(final[k], initial[k]) for k in initial if ".lora_" not in k)  # the base stayed frozen
    assert any(not torch.equal(final[k], initial[k]) for k in expected)  # and the adapter learned
    assert all(r["first_log_ratio_max"] < 1e-5 for r in ray_run["rows"])  # generation applies the adapter exactly
    assert 0 < ray_run["rows"][0]["reward_mean"] < 1 and ray_run["rows"][-1]["grad_norm"] > 0


def test_a_killed_lora_rollout_worker_is_replaced_and_the_run_completes(ray_run):
    (restart,) = ray_run["restarts"]
    assert restart["role"] == "rollout worker" and restart["worker"] == 0
    assert ray_run["pids"][0] != ray_run["killed"]["pid"]  # a fresh process holds worker 0
    assert [r["ray/restarts"] for r in ray_run["rows"]] == [0, 0, 1]
    assert [r["step"] for r in ray_run["rows"]] == [1, 2, 3]
    # the replacement generated step 3 with the learner's adapter: test 1's equality with the inline run covers
    # its samples, and its sync was the adapter alone like every other (test 2)


def test_a_sync_sends_the_adapter_alone(ray_run, env, tmp_path, ray_config, sft_model_dir):
    payload = ray_run["cluster"].latest
    assert set(payload) == set(ray_run["adapter"])  # every adapter tensor, nothing else
    assert all(".lora_A." in n or ".lora_B." in n for n in payload)
    lora_bytes = state_dict_bytes(payload)
    assert [r["ray/sync_bytes"] for r in ray_run["rows"]] == [lora_bytes] * 3
    full_cfg = ray_config(tmp_path, sft_model_dir, *LAYOUT)  # the same run without LoRA: every weight is sent
    model, tokenizer, task = start(full_cfg)
    full = InlineRoles.like_ray(full_cfg, model, tokenizer, task)
    full_bytes = full.metrics()["ray/sync_bytes"]
    assert full_bytes == state_dict_bytes(model.state_dict())
    print(f"\nbytes per sync: full {full_bytes:,}, LoRA r=4 {lora_bytes:,} ({full_bytes / lora_bytes:.1f}x fewer)")
    assert full_bytes > 5 * lora_bytes


def test_the_rollout_workers_sha256_catches_a_corrupted_adapter(ray_run):
    cluster = ray_run["cluster"]
    role, put = cluster.rollout_workers, cluster.rollout_workers.put

    def corrupting_put(weights):  # one bit of one adapter tensor flipped between rank 0 and the rollout worker
        name = min(weights)
        bad = weights[name].clone()
        bad.view(torch.int32).view(-1)[0] ^= 1
        return put({**weights, name: bad})

    role.put = corrupting_put
    try:
        with pytest.raises(WorkerError, match=r"^rollout worker 0 holds weights with sha256 [0-9a-f]{12} after the "
                                              r"sync; the learner sent [0-9a-f]{12}$"):
            cluster.sync()
    finally:
        del role.put
        cluster.sync()  # the true adapter again
    base = next(k for k in ray_run["weights"] if ".lora_" not in k)
    n = len(cluster.latest)
    extra = ({**cluster.latest, base: ray_run["weights"][base]}, f"0 of its {n} synced tensors missing, 1 others")
    short = (dict(sorted(cluster.latest.items())[1:]), f"1 of its {n} synced tensors missing, 0 others")
    for payload, what in (extra, short):
        with pytest.raises(WorkerError) as err:
            role.gather([role.submit(0, "load_weights", payload)])
        assert str(err.value).startswith(f"rollout worker 0 (pid {role.pids[0]}): the weights sent do not fit this "
                                         f"rollout worker's model: {what}"), str(err.value)
        assert "\n" not in str(err.value)


def test_a_resumed_lora_run_on_ray_continues_exactly(ray_run, env):
    """The step-1 checkpoint holds the adapter and its optimizer state only; restored on the learner ranks (and
    synced), steps 2-3 repeat the uninterrupted run's."""
    cluster, task, model = ray_run["cluster"], ray_run["task"], ray_run["model"]
    path = min(checkpoint_root(env.out / "run").iterdir())
    manifest, weights, state = load_checkpoint(path)
    assert (manifest["phase"], manifest["step"]) == ("rl", 1)
    assert set(weights["policy"]) == set(ray_run["adapter"])
    rows = logged_run(env.cfg, cluster, task, env.out / "resumed", Resumed("rl", 1, weights, state, path))
    assert steady(rows) == steady(ray_run["rows"][1:])
    final = adapter(model)
    assert all(torch.equal(final[n], ray_run["adapter"][n]) for n in final)


def test_prompt_tuning_syncs_its_soft_prompt_alone(tmp_path, ray_config, sft_model_dir):
    """model.peft=prompt_tuning takes the same path (no Ray needed to show it): in the Ray layout in this process
    the rollout worker's copy receives the soft prompt alone, and the run equals backend local's, where the
    learner's own policy generates."""
    cfg = ray_config(tmp_path, sft_model_dir, "rl.steps=2", "rl.lr=1e-2", "ray.num_rollout_workers=1",
                     "ray.num_learners=1", "model.peft=prompt_tuning", "model.prompt_tuning.num_virtual_tokens=4")
    runs = []
    for make_roles in (InlineRoles.local, InlineRoles.like_ray):
        model, tokenizer, task = start(cfg)
        torch.set_num_threads(cfg.ray.threads_per_worker)
        roles, logger = make_roles(cfg, model, tokenizer, task), Rows()
        train_rl(cfg, roles, task, logger)
        runs.append((roles, [{k: v for k, v in r.items() if not k.startswith("ray/")} for r in logger.rows],
                     adapter(model), logger.rows))
    (_, local_rows, local_prompt, _), (roles, rows, prompt, raw) = runs
    (name,) = prompt  # one tensor: the soft prompt (N, C)
    assert set(roles.latest) == {name} and "prompt_encoder" in name
    assert [r["ray/sync_bytes"] for r in raw] == [4 * prompt[name].size(1) * 4] * 2  # N x C float32
    # Equal to float rounding, not bit for bit: the learner's own policy and the rollout worker's copy run the same
    # products on different buffers, and on an AMD EPYC (2026-12-02) MKL's float32 GEMM gave them ~1e-7 apart (on
    # Intel CPUs they were equal). The tokens, hence every count and accuracy, are the same.
    assert [r.keys() for r in steady(rows)] == [r.keys() for r in steady(local_rows)]
    for mine, theirs in zip(steady(rows), steady(local_rows)):
        for key, value in theirs.items():
            exact = isinstance(value, (str, bool)) or value is None
            assert mine[key] == (value if exact else pytest.approx(value, rel=1e-5, abs=1e-6)), key
    torch.testing.assert_close(prompt[name], local_prompt[name], rtol=1e-5, atol=1e-6)
    assert rows[-1]["grad_norm"] > 0


@pytest.mark.parametrize("overrides,accepted", [
    (["model.peft=lora"], True),
    (["model.peft=prompt_tuning"], True),  # the soft prompt is synced the same way (its one tensor)
    (["model.peft=lora", "ray.engine=vllm", "ray.rollout_worker_gpus=1"], True),  # LoRARequest (vllm_engine.py)
    (["model.peft=prompt_tuning", "ray.engine=vllm", "ray.rollout_worker_gpus=1"], False),
])
def test_the_config_takes_peft_with_backend_ray(overrides, accepted):
    base = ["backend=ray", "rl.prompts_per_step=4", "rl.group_size=4"]
    if accepted:
        assert build_config(None, [*base, *overrides]).model.peft is not None
        return
    with pytest.raises(ConfigError) as err:
        build_config(None, [*base, *overrides])
    message = str(err.value)
    assert "model.peft=prompt_tuning is not available with ray.engine=vllm" in message and "\n" not in message
