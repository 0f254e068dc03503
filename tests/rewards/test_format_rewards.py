"""Format rewards (answer tag, whole layout) and DAPO's overlong penalty."""

from __future__ import annotations

import pytest

from posttrain.rewards import THINK_ANSWER, RewardSet, layout_reward, overlong_penalty, tag_format_reward


def test_tag_format_wants_exactly_one_non_empty_tag():
    fn = tag_format_reward("answer", score=0.5)
    completions = ["<answer>42</answer>", "x <answer>\n42\n</answer> y", "<answer> </answer>", "42",
                   "<answer>1</answer><answer>2</answer>", "<answer>42"]
    assert fn([""] * 6, completions) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert fn.__name__ == "answer_tag_format"


def test_think_answer_layout():
    fn = layout_reward(THINK_ANSWER, name="r1_layout")
    completions = ["<think>a\nb</think>\n<answer>7</answer>", " <think></think><answer>7</answer>\n",
                   "<answer>7</answer>", "<think>a</think><answer>7</answer> trailing", "preamble <think>a</think>"
                   "<answer>7</answer>"]
    assert fn([""] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_overlong_penalty_follows_dapo():
    fn = overlong_penalty(max_length=10, buffer=4)
    lengths = [0, 6, 7, 8, 10, 11, 100]
    assert fn([""] * 7, [""] * 7, completion_lengths=lengths) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert fn([""] * 2, ["x" * 6, "x" * 12]) == [0.0, -1.0]  # characters when no token lengths are given
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(max_length=10, buffer=0)


def test_format_and_length_compose_with_weights():
    rs = RewardSet({"format": (tag_format_reward(), 0.2), "overlong": overlong_penalty(40, 10)})
    s = rs.score(["p", "p"], ["<answer>1</answer>", "x" * 50])
    assert s.rewards == [pytest.approx(0.2), pytest.approx(-1.0)]
