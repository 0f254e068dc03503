"""What the data-backed tasks (gsm8k, math, mbpp) share: loading, the held-out split, sampling, scoring.

A task has the shape of `ArithmeticTask`, so the SFT and RL recipes can use it unchanged:

    name, train_problems, eval_problems      problems have at least `.prompt`
    reward(prompts, completions, problems)   -> list[float], one per completion (errors score `default`)
    sample_prompts(rng, n)                   n distinct training problems
    demonstration(problem, rng)              the reference completion, for SFT

and adds `score(...)`, which returns the per-function breakdown and metrics (`reward/errors`, `reward/<name>`)
of its RewardSet, for the loop to log.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from posttrain.rewards import RewardBreakdown, RewardSet, extract_answer, normalize_answer
from posttrain.tasks.data import Row, load_rows, split_eval


@dataclass(frozen=True)
class MathProblem:
    """A gsm8k or math problem."""

    prompt: str
    answer: str  # gold final answer, e.g. "72", "1,000", "\\frac{14}{3}"
    question: str
    solution: str  # the worked reference solution (the SFT demonstration)
    id: str  # where it came from: "train.jsonl:12", or the dataset's own id


def math_answer_key(completion: str) -> str:
    """The final answer a completion gives, normalised (rewards/math.py), else its stripped text: what
    majority voting (`posttrain eval --samples`) counts."""
    answer = extract_answer(completion)
    return normalize_answer(answer) if answer else completion.strip()


class DatasetTask:
    """Base class: subclasses set `name` and implement `parse_row`, `reward_set` and `reward_fields`."""

    name = "dataset"

    def __init__(self, path: str | Path | None = None, seed: int = 0, num_eval: int = 0,
                 eval_path: str | Path | None = None, hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_split: str = "train", hf_eval_split: str | None = None):
        """Training rows from `path` (JSONL) or `hf_dataset` (split `hf_split`). Held-out rows from `eval_path` or
        `hf_eval_split` when given; otherwise a seeded `num_eval` of the training rows, removed from training."""
        problems = [self.parse_row(r) for r in load_rows(path, hf_dataset, hf_split, hf_config)]
        if eval_path is not None or hf_eval_split is not None:
            source = (None, hf_dataset) if eval_path is None else (eval_path, None)
            self.train_problems = problems
            self.eval_problems = [self.parse_row(r) for r in load_rows(*source, hf_eval_split or hf_split, hf_config)]
        else:
            self.train_problems, self.eval_problems = split_eval(problems, num_eval, seed, self.name)
        self.rewards = self.reward_set()

    def parse_row(self, row: Row):
        """One problem from one row; raises DataError naming `row.where`."""
        raise NotImplementedError

    def reward_set(self) -> RewardSet:
        raise NotImplementedError

    def reward_fields(self, problems: Sequence) -> dict[str, list]:
        """The per-sample task fields the reward functions read, e.g. {"answer": [...]}."""
        raise NotImplementedError

    def score(self, prompts: list[str], completions: list[str], problems: Sequence) -> RewardBreakdown:
        return self.rewards.score(prompts, completions, **self.reward_fields(problems))

    def reward(self, prompts: list[str], completions: list[str], problems: Sequence) -> list[float]:
        return self.score(prompts, completions, problems).rewards

    def sample_prompts(self, rng: random.Random, n: int) -> list:
        """`n` distinct training problems."""
        return rng.sample(self.train_problems, n)

    def demonstration(self, problem, rng: random.Random) -> str:
        """The reference solution of the data."""
        return problem.solution
