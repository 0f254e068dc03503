"""The gsm8k task on real data (a sample of the train file, tests/data/samples/gsm8k): the split, prompts, gold
answers, rewards, malformed rows, and loading through Hugging Face `datasets` (a local data directory, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.errors import DataError, PosttrainError
from posttrain.tasks.gsm8k import GSM8KTask
from tests.tasks.conftest import GSM8K, GSM8K_SAMPLE_ROWS

PATH = GSM8K

# 50 held out of the sample's 201 rows (the full file's 7473 held out 200): enough left to draw 16 training prompts.
NUM_EVAL = 50


@pytest.fixture(scope="module")
def task() -> GSM8KTask:
    return GSM8KTask(PATH, seed=0, num_eval=NUM_EVAL)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_split_is_disjoint_deterministic_and_complete(task):
    assert (len(task.train_problems), len(task.eval_problems)) == (GSM8K_SAMPLE_ROWS - NUM_EVAL, NUM_EVAL)
    assert not {p.id for p in task.train_problems} & {p.id for p in task.eval_problems}
    again = GSM8KTask(PATH, seed=0, num_eval=NUM_EVAL)
    assert [p.id for p in again.eval_problems] == [p.id for p in task.eval_problems]
    assert {p.id for p in GSM8KTask(PATH, seed=1, num_eval=NUM_EVAL).eval_problems} != \
        {p.id for p in task.eval_problems}


def test_problems_carry_prompt_gold_answer_and_solution(task):
    first = next(p for p in task.train_problems + task.eval_problems if p.id.endswith("train.jsonl:1"))
    assert first.answer == "72" and first.solution.endswith("#### 72")
    assert first.prompt.startswith("Natalia sold clips") and first.prompt.endswith('after "####".')
    # "1,080" (the sample's last row, line 346 of the full file): kept as written
    assert any("," in p.answer for p in task.train_problems + task.eval_problems)


def test_reference_solutions_score_one_and_wrong_answers_zero(task):
    problems = task.eval_problems
    prompts = [p.prompt for p in problems]
    assert task.reward(prompts, [task.demonstration(p, random.Random(0)) for p in problems], problems) == \
        [1.0] * len(problems)
    s = task.score(prompts, ["The answer is 0.123456"] * len(problems), problems)
    assert s.rewards == [0.0] * len(problems) and s.metrics["reward/correct"] == 0.0


def test_sample_prompts_draws_distinct_training_problems(task):
    drawn = task.sample_prompts(random.Random(0), 16)
    assert len({p.id for p in drawn}) == 16 and set(drawn) <= set(task.train_problems)


def test_separate_eval_file(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(5)]
    t = GSM8KTask(write_jsonl(tmp_path / "a.jsonl", rows), eval_path=write_jsonl(tmp_path / "b.jsonl", rows[:2]))
    assert (len(t.train_problems), len(t.eval_problems)) == (5, 2)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: invalid JSON"),
    ('["a", "list"]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"answer": "#### 3"}', r"bad\.jsonl:2: missing field 'question'"),
    ('{"question": "q", "answer": 3}', r"bad\.jsonl:2: field 'answer' should be str, got int"),
    ('{"question": "q", "answer": "no final line"}', r"bad\.jsonl:2: field 'answer' has no final '#### <number>'"),
    ('{"question": "q", "answer": "#### many"}', r"bad\.jsonl:2: final answer 'many' after '####' is not a number"),
    ('{"question": " ", "answer": "#### 1"}', r"bad\.jsonl:2: field 'question' is empty"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "#### 1"}, line])
    with pytest.raises(DataError, match=message) as err:
        GSM8KTask(path, num_eval=0)
    assert isinstance(err.value, PosttrainError) and "\n" not in str(err.value)


def test_missing_file_empty_file_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        GSM8KTask(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no rows"):
        GSM8KTask(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="num_eval=5 must be less than the 2 problems"):
        GSM8KTask(write_jsonl(tmp_path / "two.jsonl", [{"question": "q", "answer": "#### 1"}] * 2), num_eval=5)
    with pytest.raises(DataError, match="exactly one data source"):
        GSM8KTask()


def test_hugging_face_dataset_from_a_local_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "gsm8k_local"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"question": f"q{i}", "answer": f"so\n#### {i}"} for i in range(6)])
    write_jsonl(data / "test.jsonl", [{"question": "t", "answer": "#### 9"}])
    t = GSM8KTask(hf_dataset=str(data), hf_config=None, hf_split="train", hf_eval_split="test")
    assert (len(t.train_problems), len(t.eval_problems)) == (6, 1)
    assert t.eval_problems[0].answer == "9" and t.eval_problems[0].id == f"{data}[test] row 0"
    with pytest.raises(DataError, match="cannot load"):
        GSM8KTask(hf_dataset=str(tmp_path / "nope"), hf_config=None)
