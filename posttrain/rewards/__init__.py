"""Reward functions `(prompts, completions, **task_fields) -> list[float | None]`, their safe weighted
composition, and the built-in verifiers: math answers, code run in the sandbox, format and length.
See docs/rewards.md."""

from posttrain.rewards.base import (
           RewardFn,
           RewardSet,
           RewardBreakdown,
           reward_metrics,
           reward_name,
           safe_call,
)
from posttrain.rewards.code import (
           code_tests_reward,
           extract_code,
           humaneval_program,
           humaneval_reward,
)
from posttrain.rewards.format import (
           THINK_ANSWER,
           layout_reward,
           overlong_penalty,
           tag_format_reward,
)
from posttrain.rewards.math import (
           answers_match,
           extract_answer,
           extract_boxed,
           math_reward,
           normalize_answer,
)

__all__ = ["RewardFn", "RewardSet", "RewardBreakdown", "THINK_ANSWER", "answers_match", "code_tests_reward",
           "extract_answer", "extract_boxed", "extract_code", "humaneval_program", "humaneval_reward",
           "layout_reward", "math_reward", "normalize_answer", "overlong_penalty", "reward_metrics", "reward_name",
           "safe_call", "tag_format_reward"]
