"""Math answer checking: extraction, normalisation, equivalence (plain and through math-verify), and the gold
answers of real GSM8K and MATH-500 rows (the samples in tests/data/samples)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.rewards import answers_match, extract_answer, extract_boxed, math_reward, normalize_answer
from posttrain.rewards.math import extract_hashes, number_value

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def jsonl(relative: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / relative).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # the last box; escaped braces kept
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{2", "3"),  # an unclosed box is skipped
    ("48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    ("We add them. The answer is 18 apples.", "18 apples"),
    ("Thus the final answer is: $\\frac{3}{4}$.", "$\\frac{3}{4}$"),
    ("The answer is 3.5.", "3.5"),
    ("I think 3/4 of 12 is 9", "9"),
    ("pay $1,234.50 then -7", "-7"),
    ("it costs 1,234.50", "1,234.50"),
    ("a ratio of 3/4", "3/4"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extractors_return_none_when_absent():
    assert extract_boxed("no box") is None and extract_hashes("no hashes") is None
    assert extract_boxed("\\boxed{") is None


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"), ("$1,000.00", "1000"), ("\\$18.90", "18.9"), ("50\\%", "50"), ("50%", "50"),
    ("18.0", "18"), ("-0", "0"), ("+5", "5"), ("0.50", "0.5"), (".5", "0.5"),
    ("10 \\text{ cm}", "10"), ("18 apples", "18"), ("90^\\circ", "90"), ("5 dollars.", "5"),
    ("x = 5", "5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("  \\left( 1,2 \\right) ", "( 1,2 )"),
    ("1,2,3", "1,2,3"), ("2x", "2x"), ("**42**", "42"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_number_value():
    assert number_value("\\frac{3}{4}") == number_value("3/4") == number_value("0.75")
    assert number_value("-\\frac{1}{2}") == number_value("-0.5")
    assert number_value("\\frac12") == number_value("0.5")
    assert number_value("1/0") is None and number_value("\\sqrt{2}") is None and number_value("x") is None


@pytest.mark.parametrize("predicted, gold", [
    ("72", "72"), ("1000", "1,000"), ("$1,000", "1000"), ("5.0", "5"), ("10\\%", "10"), ("0.5", "\\frac{1}{2}"),
    ("14/3", "\\frac{14}{3}"), ("x=2", "2"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("p-q", "p - q"), ("(x+1)^2", "x^2+2x+1"),
    ("4\\frac{2}{3}", "\\frac{14}{3}"), ("C", "\\text{(C)}"), ("3\\pi", "3 \\pi"),
])
def test_equivalent_answers(predicted, gold):
    assert answers_match(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("73", "72"), ("4.67", "\\frac{14}{3}"), ("q - p", "p - q"), ("[1,3]", "[1,3)"), ("\\pi", "3.14159"),
    (None, "5"), ("", "5"), ("\\frac{1}{0}", "1"), ("nonsense{{", "5"),
])
def test_different_answers(predicted, gold):
    assert not answers_match(predicted, gold)


def test_math_reward():
    completions = ["... so \\boxed{\\frac{1}{2}}", "#### 0.5", "The answer is 1/3.", "I give up"]
    assert math_reward([""] * 4, completions, answer=["0.5"] * 4) == [1.0, 1.0, 0.0, 0.0]


def _change_final_number(text: str) -> str:
    """The same solution text with the number after '####' increased by one."""
    head, _, tail = text.rpartition("####")
    number = re.search(r"-?[\d,]*\.?\d+", tail)
    value = float(number.group(0).replace(",", "")) + 1
    new = str(int(value)) if value.is_integer() else str(value)
    return f"{head}#### {tail[:number.start()].strip()}{new}"


def test_gsm8k_gold_solutions_score_one_and_changed_final_numbers_score_zero():
    rows = jsonl("gsm8k/train.jsonl")
    golds = [extract_hashes(r["answer"]) for r in rows]
    right = math_reward([r["question"] for r in rows], [r["answer"] for r in rows], answer=golds)
    changed = [_change_final_number(r["answer"]) for r in rows]
    wrong = math_reward([r["question"] for r in rows], changed, answer=golds)
    assert len(rows) == 201  # the sample (tests/data/samples/gsm8k/SOURCE.md); the full file has 7473
    assert sum(right) == len(rows)
    assert sum(wrong) == 0


def test_math500_gold_solutions_score_one():
    rows = jsonl("math500/dev100.jsonl")
    scores = math_reward([r["problem"] for r in rows], [r["solution"] for r in rows],
                         answer=[r["answer"] for r in rows])
    failures = [r["unique_id"] for r, s in zip(rows, scores) if s != 1.0]
    assert failures == [] and len(rows) == 100
