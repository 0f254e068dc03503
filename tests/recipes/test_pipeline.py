"""The RLHF pipeline end to end on a tiny model, its config, and its confidence interval."""

import json
import math
from pathlib import Path

import pytest

from posttrain.recipes.pipeline import RLHF_DEFAULTS, confidence_interval, rlhf_config, run_rlhf
from tests.conftest import tiny_run_dict

ROOT = Path(__file__).resolve().parents[2]


def tiny_rlhf(tmp_path) -> dict:
    d = tiny_run_dict(tmp_path / "run")
    d["rl"] = {"steps": 2, "prompts_per_step": 4, "max_new_tokens": 4, "eval_every": 0, "ptx_batch_size": 4,
               "warmup_steps": 1}
    d["rm"] = {"steps": 3, "num_pairs": 24, "batch_size": 8, "warmup_steps": 1, "eval_every": 0,
               "calibration_size": 8}
    return d


def test_shipped_config_is_the_pipeline_default():
    shipped, _ = rlhf_config({}, [])
    from_file, _ = rlhf_config(__import__("yaml").safe_load((ROOT / "configs/rlhf_demo.yaml").read_text()), [])
    assert shipped == from_file


def test_ablation_differs_only_in_beta_and_ptx(tmp_path):
    cfg, ablation = rlhf_config({}, [f"output_dir={tmp_path}"])
    assert cfg.rl.reward_model_path == str(tmp_path / "rm")
    assert (cfg.rl.kl_coef, cfg.rl.ptx_coef) == (RLHF_DEFAULTS["rl"]["kl_coef"], RLHF_DEFAULTS["rl"]["ptx_coef"])
    assert (ablation.rl.kl_coef, ablation.rl.ptx_coef) == (0, 0)
    a, b = cfg.model_dump(), ablation.model_dump()
    a["rl"].pop("kl_coef"), a["rl"].pop("ptx_coef"), b["rl"].pop("kl_coef"), b["rl"].pop("ptx_coef")
    assert a == b


def test_confidence_interval_of_paired_differences():
    before = [1, 0, 0, 1, 0, 0, 1, 0]
    after = [1, 1, 0, 1, 1, 0, 0, 1]
    mean, lo, hi = confidence_interval(before, after)
    d = [0, 1, 0, 0, 1, 0, -1, 1]
    sd = math.sqrt(sum((x - 0.25) ** 2 for x in d) / 7)
    assert mean == pytest.approx(0.25)
    assert (lo, hi) == pytest.approx((0.25 - 1.96 * sd / math.sqrt(8), 0.25 + 1.96 * sd / math.sqrt(8)))


def test_pipeline_runs_every_stage_and_writes_its_report(tmp_path):
    cfg, ablation = rlhf_config(tiny_rlhf(tmp_path), [])
    summary = run_rlhf(cfg, ablation)
    out = Path(cfg.output_dir)
    for name in ("sft/model.safetensors", "rm/model.safetensors", "final/model.safetensors", "ppo/metrics.jsonl",
                 "ablation/metrics.jsonl", "report.png", "rlhf.png", "summary.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["improvement_ci95"][0] <= summary["improvement"] <= summary["improvement_ci95"][1]
    assert summary["improvement"] == pytest.approx(summary["ppo_accuracy"] - summary["sft_accuracy"])
    ppo = [json.loads(line) for line in (out / "ppo/metrics.jsonl").read_text().splitlines()]
    assert {"gold_score", "rm_score_mean", "kl", "ptx_loss", "value_loss", "explained_variance"} <= set(ppo[-1])
    ab = [json.loads(line) for line in (out / "ablation/metrics.jsonl").read_text().splitlines()]
    assert "kl" not in ab[-1] and "ptx_loss" not in ab[-1]  # no reference, no ptx: beta = lambda_ptx = 0
    assert 0 <= summary["ablation"]["accuracy"] <= 1
