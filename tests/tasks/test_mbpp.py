"""The mbpp task on real rows (a sample of the file, tests/data/samples/mbpp): the official split, prompts,
reference solutions passing in the sandbox, wrong ones failing, malformed rows."""

from __future__ import annotations

import json
import random
import pytest

from posttrain.errors import DataError
from posttrain.tasks.mbpp import MBPPTask
from tests.tasks.conftest import MBPP, MBPP_TEST_IDS, MBPP_TRAIN_IDS, MBPP_VALIDATION_IDS

PATH = MBPP


@pytest.fixture(scope="module")
def task() -> MBPPTask:
    return MBPPTask(PATH)


def test_official_split(task):
    # The sample holds all 90 validation rows but only some train and test rows (the full file: 374 and 500), so
    # the ids are checked against the sample's: each row lands in the split its task_id names, and no other.
    assert (len(task.train_problems), len(task.eval_problems)) == (51, 90)
    assert {p.task_id for p in task.train_problems} == MBPP_TRAIN_IDS
    assert {p.task_id for p in task.eval_problems} == MBPP_VALIDATION_IDS == set(range(511, 601))
    assert {p.task_id for p in MBPPTask(PATH, eval_split="test").eval_problems} == MBPP_TEST_IDS


def test_prompt_has_the_description_and_the_tests(task):
    p = task.eval_problems[0]
    assert p.prompt.startswith("You are an expert Python programmer, and here is your task: ")
    assert all(t in p.prompt for t in p.test_list)
    assert "\r" not in p.solution and len(p.test_list) == 3


def test_reference_solutions_pass_and_wrong_ones_fail(task):
    problems = task.eval_problems[::6]  # 15 problems spread over the split
    prompts = [p.prompt for p in problems]
    demos = [task.demonstration(p, random.Random(0)) for p in problems]
    fenced = [f"Here you go:\n```python\n{d}\n```" for d in demos]
    wrong = ["def solution(*args):\n    return None\n"] * len(problems)
    scores = task.score(prompts + prompts + prompts, demos + fenced + wrong, problems * 3)
    n = len(problems)
    assert scores.rewards == [1.0] * (2 * n) + [0.0] * n
    assert scores.metrics["reward/errors"] == 0


def test_partial_credit(task):
    p = next(p for p in task.eval_problems if p.task_id == 511)  # find_Min_Sum(num)
    t = MBPPTask(PATH, partial_credit=True)
    two_of_three = "def find_Min_Sum(num):\n    return {12: 7, 2: 2}.get(num, 0)\n"
    assert t.reward([p.prompt] * 2, [p.solution, two_of_three], [p, p]) == [1.0, pytest.approx(2 / 3)]
    assert task.reward([p.prompt], [two_of_three], [p]) == [0.0]  # all-or-nothing by default


@pytest.mark.parametrize("row, message", [
    ({"task_id": 1, "text": "t", "code": "c", "test_list": []}, r"mbpp\.jsonl:1: field 'test_list' is empty"),
    ({"task_id": "1", "text": "t", "code": "c", "test_list": ["assert 1"]}, r"field 'task_id' should be int"),
    ({"task_id": 1, "text": "t", "code": "c", "test_list": [3]}, r"field 'test_list' should hold non-empty strings"),
    ({"task_id": 1, "code": "c", "test_list": ["assert 1"]}, r"mbpp\.jsonl:1: missing field 'prompt'"),
])
def test_malformed_rows(tmp_path, row, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        MBPPTask(path)


def test_unknown_split_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        MBPPTask(PATH, eval_split="dev")
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 700, "text": "t", "code": "c", "test_list": ["assert 1"]}) + "\n")
    with pytest.raises(DataError, match="no rows with task_id 511-600"):
        MBPPTask(path)
