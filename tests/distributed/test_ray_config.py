"""backend / ray config keys: defaults, one-line errors naming the key, and the CLI refusing backend ray outside
`posttrain rl` (one line, exit code 2, no output directory), as tests/test_errors.py does for every other case."""

from __future__ import annotations

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, RunConfig, build_config

RAY = ["backend=ray", "rl.prompts_per_step=4", "rl.group_size=4"]


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(None, list(overrides))
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_defaults():
    cfg = RunConfig()
    assert cfg.backend == "local"
    r = cfg.ray
    assert (r.address, r.cpus, r.num_rollout_workers, r.num_learners, r.num_reward_workers, r.engine) == \
        (None, None, 2, 1, 1, "torch")
    assert r.rollout_worker_cpus * 2 + r.learner_cpus + r.reward_worker_cpus <= 2  # the default layout fits 2 CPUs
    ray = build_config(None, ["backend=ray", "ray.num_learners=2", "ray.address=auto"])
    assert (ray.backend, ray.ray.num_learners, ray.ray.address) == ("ray", 2, "auto")


@pytest.mark.parametrize("overrides,expected", [
    (["ray.num_rollout_workers=3"], "rl.prompts_per_step * rl.group_size (16) must be divisible by "
                                    "ray.num_rollout_workers (3)"),
    (["ray.num_learners=3"], "must be divisible by ray.num_learners (3)"),
    (["rl.prompts_per_step=6", "ray.num_learners=2", "rl.micro_batch_size=8"],
     "rl.micro_batch_size (8) must divide each learner's share of a minibatch (12 sequences"),
    (["ray.address=auto", "ray.cpus=4"], "ray.cpus applies only to a local instance"),
    (["ray.engine=vllm"], "ray.engine 'vllm' needs a GPU per rollout worker"),
    (["ray.engine=sglang"], "ray.engine: Input should be 'torch' or 'vllm'"),
    (["ray.timeout_s=0"], "ray.timeout_s: Input should be greater than 0"),
    (["ray.num_learners=0"], "ray.num_learners: Input should be greater than or equal to 1"),
    (["ray.num_lerners=2"], "unknown config key 'ray.num_lerners' (did you mean 'ray.num_learners'?)"),
    (["backend=slurm"], "backend: Input should be 'local' or 'ray'"),
])
def test_errors_name_the_key(overrides, expected):
    base = [o for o in RAY if not (o.startswith("backend=") and any(x.startswith("backend=") for x in overrides))]
    assert expected in error_of(*base, *overrides)


def test_the_local_backend_ignores_the_ray_layout():
    cfg = build_config(None, ["rl.prompts_per_step=4", "rl.group_size=4", "ray.num_learners=3"])
    assert cfg.backend == "local" and cfg.ray.num_learners == 3


TINY = ["threads=1", "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.intermediate_size=64", "task.num_eval=20", "task.max_operand=20",
        "sft.steps=2", "rl.steps=1", "rl.prompts_per_step=4", "rl.group_size=4", "rm.steps=1"]


@pytest.mark.parametrize("argv,expected", [
    (["sft", "CFG", "backend=ray"], "backend ray runs only posttrain rl; posttrain sft runs in one process"),
    (["demo", "backend=ray"], "backend ray runs only posttrain rl; posttrain demo runs in one process"),
    (["dpo", "CFG", "backend=ray"], "posttrain dpo runs in one process"),
    (["rl", "CFG", "backend=ray", "ray.num_learners=3"], "must be divisible by ray.num_learners (3)"),
    (["rl", "CFG", "backend=ray", "ray.num_rollout_workrs=3"], "unknown config key 'ray.num_rollout_workrs'"),
], ids=["sft", "demo", "dpo", "learners", "unknown-key"])
def test_cli_errors_are_one_line_exit_2_and_leave_nothing(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.yaml").write_text("rl:\n  steps: 1\n")
    out = tmp_path / "run"
    argv = [str(tmp_path / "ok.yaml") if a == "CFG" else a for a in argv]
    at = 1 if argv[0] == "demo" else 2
    code = main([*argv[:at], *TINY, f"output_dir={out}", *argv[at:]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert expected in lines[0], lines[0]
    assert not out.exists()
