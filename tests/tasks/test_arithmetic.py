"""Arithmetic task: a disjoint, seeded eval split, correct answers, the exact-match reward, and the
drop-carry demonstrator mistake."""

import random

import pytest

from posttrain.config import TaskConfig
from posttrain.tasks import ArithmeticTask, build_task, exact_match_reward
from posttrain.tasks.arithmetic import drop_carry_answer, has_units_carry


def task(seed=0, **kw):
    base = {"max_operand": 20, "num_eval": 30, "operators": ["+", "-", "*"]}
    return ArithmeticTask(TaskConfig(**{**base, **kw}), seed)


def test_eval_split_is_disjoint_from_train_and_covers_every_problem():
    t = task()
    assert len(t.eval_problems) == 30
    eval_prompts = {p.prompt for p in t.eval_problems}
    train_prompts = {p.prompt for p in t.train_problems}
    assert len(eval_prompts) == 30
    assert not eval_prompts & train_prompts
    assert len(eval_prompts | train_prompts) == len(t.eval_problems) + len(t.train_problems) == 3 * 21 * 21


def test_split_is_deterministic_per_seed_and_differs_across_seeds():
    assert task(seed=3).eval_problems == task(seed=3).eval_problems
    assert task(seed=3).train_problems == task(seed=3).train_problems
    assert {p.prompt for p in task(seed=3).eval_problems} != {p.prompt for p in task(seed=4).eval_problems}
    assert build_task(TaskConfig(max_operand=20, num_eval=30), 3).eval_problems == task(
        seed=3, operators=["+"]).eval_problems


def test_answers_are_correct():
    t = task(min_operand=0, max_operand=12)
    expected = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in t.eval_problems + t.train_problems:
        assert p.prompt == f"{p.a}{p.op}{p.b}="
        assert p.answer == str(expected[p.op](p.a, p.b))
        assert 0 <= p.a <= 12 and 0 <= p.b <= 12
    by_prompt = {p.prompt: p.answer for p in t.eval_problems + t.train_problems}
    assert (by_prompt["7+8="], by_prompt["3-9="], by_prompt["12*11="]) == ("15", "-6", "132")


def test_only_configured_operators_appear():
    t = task(operators=["*"])
    assert {p.op for p in t.train_problems + t.eval_problems} == {"*"}


def test_too_few_problems_for_the_eval_split_is_an_error():
    with pytest.raises(ValueError, match="num_eval"):
        task(max_operand=2, operators=["+"], num_eval=9)


def test_sample_prompts_draws_distinct_training_problems():
    t = task()
    drawn = t.sample_prompts(random.Random(0), 50)
    assert len({p.prompt for p in drawn}) == 50
    assert set(drawn) <= set(t.train_problems)
    assert drawn == t.sample_prompts(random.Random(0), 50)


def test_exact_match_reward_strips_surrounding_whitespace():
    completions = ["95", " 95\n", "95 ", "9 5", "095", "95.", "", "-6"]
    answers = ["95"] * 7 + ["-6"]
    assert exact_match_reward([""] * 8, completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    t = task()
    p = t.eval_problems[0]
    assert t.reward([p.prompt], [f" {p.answer}\n"], [p]) == [1.0]


def test_drop_carry_forgets_the_units_carry():
    t = task()
    p = next(p for p in t.train_problems if p.op == "+" and (p.a, p.b) == (17, 18))
    assert has_units_carry(p) and drop_carry_answer(p) == "25"
    assert not has_units_carry(next(p for p in t.train_problems if p.op == "+" and (p.a, p.b) == (12, 13)))
    assert not has_units_carry(next(p for p in t.train_problems if p.op == "*" and (p.a, p.b) == (9, 9)))


def test_drop_carry_demos_at_rate_one_are_all_wrong_on_carry_problems():
    t = task(demo_error="drop_carry", demo_error_rate=1.0)
    rng = random.Random(0)
    carry = 0
    for p in t.train_problems:
        demo = t.demonstration(p, rng)
        if p.op == "+" and (p.a % 10) + (p.b % 10) >= 10:
            carry += 1
            assert demo == str(int(p.answer) - 10)
        else:
            assert demo == p.answer
    assert carry > 50


@pytest.mark.parametrize("kw", [{"demo_error": "drop_carry", "demo_error_rate": 0.0},
                                {"demo_error": "none", "demo_error_rate": 1.0}])
def test_demos_are_all_correct_without_the_mistake(kw):
    t = task(**kw)
    rng = random.Random(0)
    assert all(t.demonstration(p, rng) == p.answer for p in t.train_problems)


def test_partial_error_rate_is_about_right():
    t = task(operators=["+"], max_operand=99, num_eval=100, demo_error_rate=0.6)
    rng = random.Random(0)
    carry = [p for p in t.train_problems if has_units_carry(p)]
    wrong = sum(t.demonstration(p, rng) != p.answer for p in carry)
    assert 0.55 < wrong / len(carry) < 0.65
