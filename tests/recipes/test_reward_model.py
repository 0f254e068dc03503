"""Reward-model training: synthetic gold-labelled pairs, Bradley-Terry steps that lower the loss,
calibration stored with the model, HH-RLHF data, and the `posttrain rm` command."""

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.algos.preference import bradley_terry
from posttrain.data import PreferencePair, load_preference_pairs
from posttrain.train.metrics import MetricsLogger
from posttrain.models.reward import RewardModel
from posttrain.models.value import build_scalar_model
from posttrain.recipes.reward_model import calibrate, evaluate_rm, pair_rewards, setup_rm, train_rm
from posttrain.tasks.preference import synthetic_pairs
from posttrain.tasks import ArithmeticTask

# The first 200 rows of HH-RLHF harmless-base/test (tests/data/samples/hh-rlhf/SOURCE.md).
HH = Path(__file__).resolve().parents[1] / "data" / "samples" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def test_synthetic_pairs_follow_the_gold_rule_and_are_deterministic(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path)
    task = ArithmeticTask(cfg.task, cfg.seed)
    problems = task.train_problems[:40]
    pairs = synthetic_pairs(task, tiny_model, tokenizer, problems, seed=0, samples=2)
    assert len(pairs) == 40  # every problem has wrong answers to reject
    by_prompt = {p.prompt: p for p in problems}
    for pair in pairs:
        assert pair.chosen == by_prompt[pair.prompt].answer != pair.rejected
    assert pairs == synthetic_pairs(task, tiny_model, tokenizer, problems, seed=0, samples=2)


def fixed_batch_loss(rm, pairs):
    with torch.no_grad():
        c, r = pair_rewards(rm, pairs)
        return bradley_terry(c, r)[0].mean().item()


def test_training_lowers_the_loss_and_calibration_is_stored(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rm.steps=30", "rm.batch_size=8", "rm.lr=1e-2", "rm.warmup_steps=1",
                      "rm.eval_every=5", "rm.log_every=5", "rm.calibration_size=8")
    task = ArithmeticTask(cfg.task, cfg.seed)
    pairs = synthetic_pairs(task, tiny_model, tokenizer, task.train_problems[:8], seed=0, samples=1)
    held = synthetic_pairs(task, tiny_model, tokenizer, task.eval_problems, seed=1, samples=1)
    rm = RewardModel(build_scalar_model(cfg.model, tokenizer, seed=0), tokenizer)
    before = fixed_batch_loss(rm, pairs)
    assert before == pytest.approx(math.log(2), abs=1e-6)  # the zero head scores everything 0
    state = setup_rm(cfg, rm, pairs, held)
    with MetricsLogger(tmp_path / "metrics.jsonl") as logger:
        result = train_rm(cfg, state, logger)
    assert fixed_batch_loss(rm, pairs) < before - 0.1  # it fits its 8 training pairs
    assert 0 <= result["eval_accuracy"] <= 1 and math.isfinite(result["eval_margin"])
    # the same evaluation as train_rm's last one, batch size included: a different batching pads to other lengths,
    # which moves the scores by float rounding (~1e-7 on an AMD EPYC)
    assert result == {**evaluate_rm(rm, held, cfg.rm.batch_size), "reward_mean": rm.mean, "reward_std": rm.std}
    rm.save(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward_mean"] == pytest.approx(result["reward_mean"])
    raw = RewardModel.load(tmp_path / "rm").raw_scores([p.prompt for p in pairs[:8]] * 2,
                                                       [p.chosen for p in pairs[:8]] + [p.rejected for p in pairs[:8]])
    assert raw.mean().item() == pytest.approx(result["reward_mean"], abs=1e-5)
    assert raw.std().item() == pytest.approx(result["reward_std"], rel=1e-4)


def test_calibrated_scores_have_zero_mean_and_unit_std(tokenizer, tiny_model_cfg):
    rm = RewardModel(build_scalar_model(tiny_model_cfg, tokenizer, seed=0), tokenizer)
    torch.nn.init.normal_(rm.model.score.weight, generator=torch.Generator().manual_seed(0))
    pairs = [PreferencePair(f"{a}+{a}=", str(2 * a), str(2 * a + 1)) for a in range(30)]
    calibrate(rm, pairs, n=30)
    scores = rm.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert scores.mean().item() == pytest.approx(0, abs=1e-5)
    assert scores.std().item() == pytest.approx(1, abs=1e-4)


def test_hh_rlhf_pairs_train_a_tiny_reward_model(tmp_path, make_config, tokenizer):
    cfg = make_config(tmp_path, "model.max_position_embeddings=160", "rm.steps=8", "rm.batch_size=8", "rm.lr=3e-3",
                      "rm.warmup_steps=1", "rm.eval_every=0", "rm.calibration_size=16", "rm.max_length=160")
    pairs = load_preference_pairs(HH, limit=48)
    rm = RewardModel(build_scalar_model(cfg.model, tokenizer, seed=0), tokenizer, max_length=160)
    ids, _ = rm.encode([p.prompt for p in pairs], [p.chosen for p in pairs])
    assert ids.shape[1] == 160  # long dialogues keep their last 160 characters (the final turns)
    train, held = pairs[:40], pairs[40:]
    before = fixed_batch_loss(rm, train[:8])
    state = setup_rm(cfg, rm, train, held)
    with MetricsLogger(tmp_path / "metrics.jsonl") as logger:
        train_rm(cfg, state, logger)
    assert fixed_batch_loss(rm, train[:8]) < before


@pytest.mark.slow
def test_rm_command_on_a_jsonl_file(tmp_path):
    import subprocess
    import sys

    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(12) for b in range(12)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "rm.yaml").write_text("rm:\n  steps: 5\n")
    cmd = [sys.executable, "-m", "posttrain.cli", "rm", str(tmp_path / "rm.yaml"), f"output_dir={tmp_path / 'run'}",
           "progress=false",
           "threads=1", "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64",
           f"rm.data={tmp_path / 'pairs.jsonl'}", "rm.batch_size=8", "rm.eval_fraction=0.1"]
    bad = subprocess.run(cmd[:6] + [f"rm.data={tmp_path / 'missing.jsonl'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_pairs"] + summary["eval_pairs"] == len(rows)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert RewardModel.load(tmp_path / "run" / "final").std == pytest.approx(summary["reward_std"])
