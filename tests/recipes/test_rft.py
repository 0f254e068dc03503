"""Rejection-sampling fine-tuning: the filter keeps each problem's best finished completion above the threshold,
rounds log the documented metrics and change the weights, the run is seeded, and the `posttrain rft` command."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.config import dump_config
from posttrain.train.metrics import MetricsLogger, read_metrics
from posttrain.models import build_tiny_model, save_pretrained
from posttrain.recipes.rft import select_best, setup_rft, train_rft
from posttrain.recipes.sft import setup_sft, train_sft
from posttrain.tasks import ArithmeticTask, Problem


def test_select_best_keeps_the_best_finished_completion_above_the_threshold():
    problems = [Problem(f"{a}+1=", str(a + 1), a, "+", 1) for a in range(4)]
    completions = [["1", "2", "3"], ["x", "2", "y"], ["7", "8", "9"], ["a", "b", "c"]]
    finished = [[True, True, True], [True, False, True], [True, True, True], [False, False, False]]
    scores = [[0.0, 1.0, 1.0], [0.0, 1.0, 0.2], [0.1, 0.3, 0.2], [1.0, 1.0, 1.0]]
    kept = select_best(problems, completions, finished, scores, min_score=0.5)
    # first argmax among ties; an unfinished completion is never kept; below the threshold: dropped
    assert kept == [("0+1=", "2")]
    assert select_best(problems, completions, finished, scores, min_score=None) == [
        ("0+1=", "2"), ("1+1=", "y"), ("2+1=", "8")]


@pytest.fixture(scope="module")
def sft_weights(tmp_path_factory, make_config):
    """A tiny model's weights after a few SFT steps, so that its samples end with EOS and some are right."""
    from posttrain.models import build_char_tokenizer

    cfg = make_config(tmp_path_factory.mktemp("rft_sft"), "sft.steps=30", "sft.lr=1e-2", "sft.log_every=30")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(cfg.model, tokenizer, seed=0)
    with MetricsLogger(cfg.output_dir + "/sft.jsonl") as logger:
        train_sft(cfg, setup_sft(cfg, model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)), logger)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run(cfg, tokenizer, weights, path):
    task = ArithmeticTask(cfg.task, cfg.seed)
    model = build_tiny_model(cfg.model, tokenizer, seed=0)
    model.load_state_dict(weights)
    state = setup_rft(cfg, model, tokenizer, task)
    with MetricsLogger(path) as logger:
        result = train_rft(cfg, state, logger)
    return model, result


def test_rounds_fine_tune_on_kept_samples_and_are_seeded(tmp_path, make_config, tokenizer, sft_weights):
    cfg = make_config(tmp_path, "rft.rounds=2", "rft.prompts_per_round=12", "rft.samples=3", "rft.steps=4",
                      "rft.batch_size=4", "rft.log_every=2", "rft.min_score=null", "rft.max_new_tokens=4")
    model, result = run(cfg, tokenizer, sft_weights, tmp_path / "a.jsonl")
    assert len(result["round_accuracies"]) == 2 and all(6 <= k <= 12 for k in result["kept"]), result
    assert all(not torch.equal(p, sft_weights[name]) for name, p in model.named_parameters())
    records = read_metrics(tmp_path / "a.jsonl")
    rounds = [r for r in records if "accuracy" in r]
    assert [(r["round"], r["step"]) for r in rounds] == [(1, 4), (2, 8)]
    assert {"kept", "kept_frac", "sample_accuracy", "pass_at_n", "score_mean", "time/generate", "time/score",
            "time/filter", "time/eval"} <= set(rounds[0])
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    again, result2 = run(cfg, tokenizer, sft_weights, tmp_path / "b.jsonl")
    assert result2 == result and all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_rft_command_and_its_user_errors(tmp_path, make_config, tiny_model, tokenizer, capsys):
    save_pretrained(tiny_model, tokenizer, tmp_path / "model")
    dump_config(make_config(tmp_path / "run", f"model.path={tmp_path / 'model'}", "rft.rounds=1",
                            "rft.prompts_per_round=8", "rft.samples=2", "rft.steps=2", "rft.batch_size=4",
                            "rft.min_score=null", "rft.max_new_tokens=4"), tmp_path / "tiny.yaml")
    assert main(["rft", str(tmp_path / "tiny.yaml")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"initial_accuracy", "rft_accuracy", "round_accuracies", "kept", "eval_problems"} <= set(summary)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    capsys.readouterr()
    for override, words in (("rft.prompts_per_round=100000", ["rft.prompts_per_round"]),
                            (f"rft.scorer={tmp_path / 'no_rm'}", ["no_rm"]),
                            ("rft.samplez=2", ["rft.samplez", "rft.samples"])):
        assert main(["rft", str(tmp_path / "tiny.yaml"), override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("path", ["configs/rft_arithmetic.yaml", "configs/dpo_arithmetic.yaml"])
def test_shipped_configs_point_at_the_sft_run(path):
    from pathlib import Path

    from posttrain.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / path)
    assert cfg.model.path == "runs/sft_arithmetic/final" and cfg.task.demo_error == "drop_carry"
