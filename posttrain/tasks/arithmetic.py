"""The built-in `arithmetic` task: prompts such as `37+58=`, answers such as `95`.

Every problem in the operand range is enumerated; a seeded shuffle puts `num_eval` of them in a fixed
held-out split and the rest in the training pool, so the two are disjoint and deterministic.

SFT demonstrations can carry a systematic demonstrator mistake (`demo_error="drop_carry"`: the carry
out of the units digit is forgotten, 37+58=85; or `"trailing_period"`: 37+58=95., a format slip). Imitation learns the mistake; RL with the exact-match
verifier can correct it. That gap is what the demo shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.config import TaskConfig

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    prompt: str  # "37+58="
    answer: str  # "95"
    a: int
    op: str
    b: int


def exact_match_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where the completion (surrounding whitespace stripped) equals the answer exactly, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answers, strict=True)]


def has_units_carry(p: Problem) -> bool:
    return p.op == "+" and (p.a % 10) + (p.b % 10) >= 10


def drop_carry_answer(p: Problem) -> str:
    """The answer a demonstrator who forgets the units carry would write (37+58 -> 85)."""
    return str(p.a + p.b - 10)


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg = cfg
        problems = [Problem(f"{a}{op}{b}=", str(_OPS[op](a, b)), a, op, b)
                    for op in cfg.operators
                    for a in range(cfg.min_operand, cfg.max_operand + 1)
                    for b in range(cfg.min_operand, cfg.max_operand + 1)]
        if len(problems) <= cfg.num_eval:
            raise ValueError(f"task: only {len(problems)} distinct problems in the operand range, which "
                             f"leaves none for training after task.num_eval={cfg.num_eval}")
        random.Random(f"arithmetic-split-{seed}").shuffle(problems)
        self.eval_problems: list[Problem] = problems[:cfg.num_eval]
        self.train_problems: list[Problem] = problems[cfg.num_eval:]

    def reward(self, prompts: list[str], completions: list[str], problems: list[Problem]) -> list[float]:
        return exact_match_reward(prompts, completions, [p.answer for p in problems])

    def sample_prompts(self, rng: random.Random, n: int) -> list[Problem]:
        """`n` distinct training problems."""
        return rng.sample(self.train_problems, n)

    def demonstration(self, p: Problem, rng: random.Random) -> str:
        """The completion a (possibly mistaken) demonstrator writes for `p`."""
        if self.cfg.demo_error == "drop_carry" and has_units_carry(p) and rng.random() < self.cfg.demo_error_rate:
            return drop_carry_answer(p)
        if self.cfg.demo_error == "trailing_period" and rng.random() < self.cfg.demo_error_rate:
            return p.answer + "."
        return p.answer


def wrong_answers(p: Problem, rng: random.Random, n: int = 3) -> list[str]:
    """`n` distinct plausible wrong answers: the dropped carry, off by one or ten, swapped digits, or a
    random number of the same size. Used as rejected completions of synthetic preference pairs."""
    right = int(p.answer)
    pool = {str(right + d) for d in (-10, -1, 1, 10)}
    if has_units_carry(p):
        pool.add(drop_carry_answer(p))
    if len(p.answer.lstrip("-")) > 1:
        pool.add(p.answer[:-2] + p.answer[-1] + p.answer[-2])
    pool.add(str(rng.randint(0, 10 ** len(p.answer.lstrip("-")) - 1)))
    negative_ok = right < 0
    pool = sorted(x for x in pool if x != p.answer and (negative_ok or not x.startswith("-")))
    return rng.sample(pool, min(n, len(pool)))
