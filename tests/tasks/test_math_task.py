"""The math task on MATH-500 development rows (all 100, carried in tests/data/samples/math500): gold solutions
score 1, malformed rows are one-line errors."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.errors import DataError
from posttrain.tasks.math import MathTask
from tests.tasks.conftest import MATH500

PATH = MATH500


@pytest.fixture(scope="module")
def task() -> MathTask:
    return MathTask(PATH, seed=0, num_eval=20)


def test_split_and_problem_fields(task):
    assert (len(task.train_problems), len(task.eval_problems)) == (80, 20)
    everything = task.train_problems + task.eval_problems
    assert len({p.id for p in everything}) == 100 and all(p.id.startswith("test/") for p in everything)
    polar = next(p for p in everything if p.id == "test/precalculus/807.json")
    assert polar.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert polar.prompt.startswith("Convert the point") and polar.prompt.endswith("within \\boxed{}.")


def test_every_gold_solution_scores_one(task):
    problems = task.train_problems + task.eval_problems
    demos = [task.demonstration(p, random.Random(0)) for p in problems]
    assert task.reward([p.prompt for p in problems], demos, problems) == [1.0] * 100


def test_equivalent_forms_score_one_and_wrong_answers_zero(task):
    polar = next(p for p in task.train_problems + task.eval_problems if p.id == "test/precalculus/807.json")
    completions = ["... $\\boxed{(3, \\pi/2)}$", "\\boxed{(3, \\frac{\\pi}{3})}", "the answer is 3"]
    assert task.reward([polar.prompt] * 3, completions, [polar] * 3) == [1.0, 0.0, 0.0]


def test_rows_without_answer_use_the_boxed_solution(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$."}, {"problem": "p", "solution": "s \\boxed{x^2}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    t = MathTask(path, num_eval=1)
    assert sorted(p.answer for p in t.train_problems + t.eval_problems) == ["2", "x^2"]


@pytest.mark.parametrize("row, message", [
    ({"problem": "p", "solution": "no box"}, r"math\.jsonl:1: no field 'answer' and no \\boxed\{\} answer"),
    ({"problem": "p", "solution": "s", "answer": ""}, r"math\.jsonl:1: field 'answer' should be a non-empty str"),
    ({"solution": "s", "answer": "1"}, r"math\.jsonl:1: missing field 'problem'"),
])
def test_malformed_rows(tmp_path, row, message):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        MathTask(path, num_eval=0)
