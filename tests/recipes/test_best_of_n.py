"""Best-of-n: the pass@k and best-of-k estimators against brute-force enumeration of subsets, a tiny run with the
verifier and with a reward model as scorer, and the `posttrain bon` command."""

import itertools
import json
import math
import random

import pytest
import torch

from posttrain.cli import main
from posttrain.config import dump_config
from posttrain.models import save_pretrained
from posttrain.models.reward import RewardModel
from posttrain.models.value import build_scalar_model
from posttrain.recipes.best_of_n import best_of_k, best_of_n, best_rows, build_scorer, k_values, pass_at_k
from posttrain.tasks import ArithmeticTask


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def brute_best_of_k(scores, values, k):
    """Mean over every k-subset of the value at the subset's argmax (first index among ties)."""
    subsets = list(itertools.combinations(range(len(scores)), k))
    total = 0.0
    for s in subsets:
        best = max(s, key=lambda i: (scores[i], -i))
        total += values[best]
    return total / len(subsets)


def test_pass_at_k_equals_enumeration_of_subsets():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(1000, 3, 100) == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


@pytest.mark.parametrize("seed", range(4))
def test_best_of_k_equals_enumeration_of_subsets(seed):
    rng = random.Random(seed)
    n = 9
    scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]  # with ties
    values = [rng.random() for _ in range(n)]
    for k in range(1, n + 1):
        assert best_of_k(scores, values, k) == pytest.approx(brute_best_of_k(scores, values, k), abs=1e-12)
    gold = [float(rng.random() < 0.3) for _ in range(n)]
    for k in range(1, n + 1):  # the verifier as scorer: best-of-k accuracy is pass@k
        assert best_of_k(gold, gold, k) == pytest.approx(pass_at_k(n, int(sum(gold)), k), abs=1e-12)
    assert best_of_k(scores, values, 1) == pytest.approx(sum(values) / n)


def test_k_values():
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(1) == [1]
    assert k_values(12) == [1, 2, 4, 8, 12]


def test_best_of_n_with_the_verifier(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "bon.n=8", "bon.max_new_tokens=4", "bon.batch_size=8")
    task = ArithmeticTask(cfg.task, cfg.seed)
    problems = task.eval_problems
    scorer = build_scorer("task", task)
    result = best_of_n(cfg, tiny_model, tokenizer, task, problems, scorer)
    assert [r["n"] for r in result.table] == [1, 2, 4, 8]
    accuracy = [r["accuracy"] for r in result.table]
    assert accuracy == sorted(accuracy)  # non-decreasing in n
    for row in result.table:
        assert row["accuracy"] == pytest.approx(row["pass_at_k"]) == pytest.approx(row["score_mean"])
    assert result.table[0]["accuracy"] == pytest.approx(sum(map(sum, result.gold)) / (8 * len(problems)))
    again = best_of_n(cfg, tiny_model, tokenizer, task, problems, scorer)
    assert again.completions == result.completions and again.table == result.table  # seeded
    rows = best_rows(problems, result)
    assert len(rows) == len(problems) and all(r["gold"] == float(r["num_correct"] > 0) for r in rows)


def test_best_of_n_with_a_reward_model(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "bon.n=4", "bon.max_new_tokens=4")
    rm = RewardModel(build_scalar_model(cfg.model, tokenizer, seed=0), tokenizer)
    torch.nn.init.normal_(rm.model.score.weight, generator=torch.Generator().manual_seed(0))
    rm.save(tmp_path / "rm")
    task = ArithmeticTask(cfg.task, cfg.seed)
    scorer = build_scorer(str(tmp_path / "rm"), task)
    result = best_of_n(cfg, tiny_model, tokenizer, task, task.eval_problems[:6], scorer)
    scores = [r["score_mean"] for r in result.table]
    assert scores == sorted(scores) and scores[-1] == pytest.approx(sum(max(s) for s in result.scores) / 6)


def test_bon_command_writes_table_plot_and_best(tmp_path, make_config, tiny_model, tokenizer, capsys):
    save_pretrained(tiny_model, tokenizer, tmp_path / "model")
    cfg = make_config(tmp_path / "unused")
    dump_config(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "bon"
    assert main(["bon", "--model", str(tmp_path / "model"), "--n", "4", "--config", str(tmp_path / "tiny.yaml"),
                 "--output-dir", str(out), "bon.max_new_tokens=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["n"] for r in summary["table"]] == [1, 2, 4] and summary["eval_problems"] == 20
    assert (out / "bon.png").stat().st_size > 0 and len((out / "best.jsonl").read_text().splitlines()) == 20
    assert "pass@n" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["bon", "--n", "4"], ["--model"]),  # no model
    (["bon", "--model", "no/such/dir"], ["no/such/dir"]),
    (["bon", "--model", "no/such/dir", "--n", "0"], ["bon.n"]),
])
def test_bon_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
