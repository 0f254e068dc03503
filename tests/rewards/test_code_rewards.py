"""Code rewards: code extraction, MBPP-style and HumanEval-style rewards through the sandbox, and sandbox
failures counted as reward errors rather than scored 0."""

from __future__ import annotations

import pytest

from posttrain.rewards import RewardSet, code_tests_reward, extract_code, humaneval_program, humaneval_reward
from posttrain.sandbox import SandboxConfig

TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]


@pytest.mark.parametrize("completion, code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nand better:\n```python\nx = 2\n```", "x = 2\n"),
    ("```\ny = 3\n```", "y = 3\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # truncated, unclosed fence
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence: everything
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_code_tests_reward_all_or_nothing_and_partial_credit():
    completions = ["def add(a, b):\n    return a + b\n",
                   "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\nThis adds.",
                   "def add(a, b):\n    return a - b\n",
                   "this is not python",
                   "ignored"]
    test_list = [TESTS, TESTS, TESTS, TESTS, None]
    strict = code_tests_reward(workers=2)([""] * 5, completions, test_list=test_list)
    partial = code_tests_reward(workers=2, partial_credit=True)([""] * 5, completions, test_list=test_list)
    assert strict == [1.0, 1.0, 0.0, 0.0, None]
    assert partial == [1.0, 1.0, pytest.approx(1 / 3), 0.0, None]


def test_code_tests_reward_uses_setup_code():
    fn = code_tests_reward()
    out = fn(["", ""], ["def f():\n    return K\n"] * 2, test_list=[["assert f() == 3"]] * 2,
             test_setup_code=["K = 3", ""])
    assert out == [1.0, 0.0]


def test_humaneval_reward():
    prompt = 'import math\n\ndef hyp(a, b):\n    """Hypotenuse."""\n'
    test = "def check(candidate):\n    assert candidate(3, 4) == 5\n"
    fn = humaneval_reward()
    completions = ["    return math.sqrt(a * a + b * b)\n",
                   "```python\ndef hyp(a, b):\n    return math.hypot(a, b)\n```",  # redefines: the prompt's import kept
                   "    return a + b\n"]
    assert fn(["rl prompt"] * 3, completions, test=[test] * 3, entry_point=["hyp"] * 3, prompt=[prompt] * 3) == \
        [1.0, 1.0, 0.0]
    assert "import math" in humaneval_program(prompt, completions[1], "hyp")


def test_sandbox_failures_are_reward_errors_not_zeros():
    broken = code_tests_reward(SandboxConfig(python="/nonexistent/python"))
    s = RewardSet({"tests": broken}).score([""] * 2, ["def add(a, b):\n    return a + b\n"] * 2,
                                             test_list=[TESTS, TESTS])
    assert s.components["tests"] == [None, None]
    assert s.metrics["reward/errors"] == 2
