"""model.device: validated, resolved, honoured by the RL path (on a GPU when one is visible), refused by the
commands that run on the CPU only."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError, build_config
from posttrain.errors import ModelLoadError
from posttrain.models.loading import resolve_device


def test_device_values_are_checked_and_resolved(monkeypatch):
    with pytest.raises(ConfigError, match="model.device"):
        build_config(overrides=["model.device=gpu"])
    assert resolve_device(build_config(overrides=[]).model) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(build_config(overrides=["model.device=auto"]).model) == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="model.device=cuda:1: no CUDA device is visible"):
        resolve_device(build_config(overrides=["model.device=cuda:1"]).model)


def test_a_command_that_runs_on_the_cpu_only_refuses_another_device(tmp_path, capsys):
    from posttrain import cli

    code = cli.main(["bon", "--model", str(tmp_path), "model.device=cuda", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.device=cuda: posttrain bon runs on the CPU only" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_rl_step_runs_on_the_gpu(tmp_path, make_config, tokenizer):
    from posttrain.models import load_policy
    from posttrain.rl.loop import RLRun
    from posttrain.tasks import ArithmeticTask

    cfg = make_config(tmp_path, "model.device=cuda", "rl.kl_coef=0.05")
    model, _ = load_policy(cfg.model, seed=0)
    assert next(model.parameters()).device.type == "cuda"
    run = RLRun.local(cfg, model, tokenizer, ArithmeticTask(cfg.task, cfg.seed))
    metrics = run.step()
    assert metrics["first_log_ratio_max"] < 1e-4 and metrics["grad_norm"] > 0
    assert next(run.learner.reference.parameters()).device.type == "cuda"
