"""Reward functions `(prompts, completions, **task_fields) -> list[float | None]`, their safe weighted
composition, and the built-in verifiers: math answers, code run in the sandbox, format and length; rewards from
a judge (an OpenAI-compatible endpoint: `http_judge`; a local model: `judge_local.hf_judge`).
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
from posttrain.rewards.judge import HttpJudge, http_judge, parse_grade
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

__all__ = ["HttpJudge", "RewardFn", "RewardSet", "RewardBreakdown", "THINK_ANSWER", "answers_match",
           "code_tests_reward", "extract_answer", "extract_boxed", "extract_code", "http_judge", "humaneval_program",
           "humaneval_reward", "layout_reward", "math_reward", "normalize_answer", "overlong_penalty",
           "parse_grade", "reward_metrics", "reward_name", "safe_call", "tag_format_reward"]
# posttrain.rewards.judge_local:hf_judge (a local model as a yes/no judge) imports torch: not imported here
