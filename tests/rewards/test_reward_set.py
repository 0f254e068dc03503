"""RewardSet: weighted composition, None, and failures caught per sample (exceptions, NaN, inf, bad values)
that are logged with the sample, counted, and broken down per function in the metrics."""

from __future__ import annotations

import functools
import logging
import math

import pytest

from posttrain.rewards import RewardSet, reward_name, safe_call


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def match_reward(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


def fragile_reward(prompts, completions, **_):
    """Raises on any batch that contains "boom"; fine on the others."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom!")
    return [1.0] * len(completions)


def test_weighted_sum_and_per_function_metrics():
    rs = RewardSet({"match": match_reward, "length": (length_reward, 0.5)})
    s = rs.score(["p"] * 3, ["a", "bb", "c"], answer=["a", "x", "c"])
    assert s.rewards == [1 + 0.5, 0 + 1.0, 1 + 0.5]
    assert s.components == {"match": [1.0, 0.0, 1.0], "length": [1.0, 2.0, 1.0]}
    assert s.metrics["reward/match"] == pytest.approx(2 / 3)
    assert s.metrics["reward/length"] == pytest.approx(4 / 3)
    assert s.metrics["reward/total"] == pytest.approx(4.0 / 3)
    assert s.metrics["reward/errors"] == 0 and s.metrics["reward/match/errors"] == 0
    assert rs(["p"], ["a"], answer=["a"]) == [1.5]  # a RewardSet is itself a reward function


def test_none_means_not_applicable():
    def only_even(prompts, completions, **_):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def never(prompts, completions, **_):
        return [None] * len(completions)

    s = RewardSet({"even": (only_even, 2.0), "never": never}, default=-1.0).score(["p"] * 3, ["a", "b", "c"])
    assert s.rewards == [2.0, -1.0, 2.0]
    assert s.metrics["reward/even/applicable"] == pytest.approx(2 / 3)
    assert math.isnan(s.metrics["reward/never"])
    assert s.metrics["reward/errors"] == 0


def test_an_exception_is_isolated_to_its_sample_logged_and_counted(caplog):
    rs = RewardSet({"fragile": fragile_reward, "length": length_reward})
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        s = rs.score(["p0", "p1", "p2"], ["ok", "boom", "fine"])
    assert s.components["fragile"] == [1.0, None, 1.0]
    assert s.rewards == [1.0 + 2, 4.0, 1.0 + 4]  # the failed sample keeps the other function's score
    assert s.errors == {"fragile": 1, "length": 0}
    assert s.metrics["reward/errors"] == 1 and s.metrics["reward/fragile/errors"] == 1
    logged = caplog.text
    assert "sample 1" in logged and "RuntimeError: boom!" in logged and "'p1'" in logged and "'boom'" in logged


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "1.0", [1.0], object()])
def test_non_finite_or_non_numeric_values_are_errors(bad, caplog):
    def reward(prompts, completions, **_):
        return [1.0, bad, 0.5]

    with caplog.at_level(logging.WARNING, logger="posttrain.rewards"):
        s = RewardSet({"r": reward}).score(["p"] * 3, ["a", "b", "c"])
    assert s.components["r"] == [1.0, None, 0.5]
    assert s.rewards == [1.0, 0.0, 0.5]
    assert s.metrics["reward/errors"] == 1
    assert "sample 1" in caplog.text


def test_numpy_and_torch_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")

    def reward(prompts, completions, **_):
        return [np.float32(0.5), torch.tensor(2.0), np.int64(1)]

    assert RewardSet({"r": reward}).score(["p"] * 3, ["a", "b", "c"]).rewards == [0.5, 2.0, 1.0]


def test_wrong_length_falls_back_to_one_sample_at_a_time():
    def reward(prompts, completions, **_):
        return [1.0] if len(completions) == 1 else [1.0]  # wrong for batches of 3

    s = RewardSet({"r": reward}).score(["p"] * 3, ["a", "b", "c"])
    assert s.components["r"] == [1.0, 1.0, 1.0] and s.metrics["reward/errors"] == 0


def test_a_function_failing_everywhere_counts_every_sample():
    def broken(prompts, completions, answer, **_):
        return [1.0 / 0 for _ in completions]

    s = RewardSet({"broken": broken, "match": match_reward}).score(["p"] * 2, ["a", "b"], answer=["a", "a"])
    assert s.errors["broken"] == 2 and s.metrics["reward/errors"] == 2
    assert s.rewards == [1.0, 0.0]


def test_safe_call_passes_each_sample_its_own_fields():
    seen = []

    def reward(prompts, completions, answer, **_):
        seen.append(list(answer))
        if len(completions) > 1:
            raise ValueError("batch")
        return [float(completions[0] == answer[0])]

    values, errors = safe_call(reward, "r", ["p", "q"], ["a", "x"], {"answer": ["a", "b"]})
    assert (values, errors) == ([1.0, 0.0], 0)
    assert seen == [["a", "b"], ["a"], ["b"]]


def test_names_and_validation():
    assert RewardSet([match_reward, length_reward]).fns.keys() == {"match_reward", "length_reward"}
    assert reward_name(functools.partial(match_reward, answer=["a"])) == "match_reward"
    with pytest.raises(ValueError, match="share the name"):
        RewardSet([match_reward, match_reward])
    with pytest.raises(ValueError, match="at least one"):
        RewardSet({})
    with pytest.raises(ValueError, match="finite weight"):
        RewardSet({"m": (match_reward, float("nan"))})
    with pytest.raises(ValueError, match="task field 'answer' has 1 values for 2"):
        RewardSet([match_reward]).score(["p", "q"], ["a", "b"], answer=["a"])
