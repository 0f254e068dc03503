"""Tasks by name: the protocol every task implements and the registry `build_task` reads.

A new task is one module (a class with the methods of `Task`) and one registration:

    @register_task("mytask", fields=("path", "num_eval"), description="...")
    def build_mytask(cfg: TaskConfig, seed: int) -> Task:
        return MyTask(cfg.path, seed, cfg.num_eval)

`fields` names the `task.*` config fields the task reads; a config that sets any other task field away from its
default is refused with one line naming the field and the tasks it applies to (`check_task_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from posttrain.config import TaskConfig
from posttrain.errors import ConfigError
from posttrain.rewards.base import RewardBreakdown, RewardSet


@runtime_checkable
class Task(Protocol):
    """What the recipes and the RL loop use of a task. Problems have at least `.prompt`."""

    name: str
    train_problems: Sequence  # what SFT demonstrates and RL samples prompts from
    eval_problems: Sequence  # the held-out split, disjoint from the training problems

    def reward(self, prompts: list[str], completions: list[str], problems: Sequence) -> list[float]:
        """The verifiable reward of each completion (an error scores the task's default, never raises)."""
        ...

    def sample_prompts(self, rng: random.Random, n: int) -> list:
        """`n` distinct training problems."""
        ...

    def demonstration(self, problem, rng: random.Random) -> str:
        """The reference completion of `problem`, for SFT (a ConfigError for an RL-only task)."""
        ...


def breakdown(task: Task) -> Callable[[list[str], list[str], Sequence], RewardBreakdown]:
    """The task's `score` (rewards with the per-function breakdown and metrics the loop logs) where it has one,
    else its `reward` alone (no breakdown)."""
    score = getattr(task, "score", None)
    if score is not None:
        return score
    return lambda prompts, completions, problems: RewardBreakdown(task.reward(prompts, completions, problems), {}, {}, {})


def problem_columns(problems: Sequence) -> dict[str, list]:
    """The columns reward functions get by name (rl.reward_funcs): a custom task's row columns, or every field of
    a built-in task's problem dataclass but the prompt (gsm8k: answer, question, solution, id)."""
    if not problems:
        return {}
    first = problems[0]
    if isinstance(getattr(first, "columns", None), dict):
        names = sorted(set().union(*(p.columns for p in problems)))
        return {c: [p.columns.get(c) for p in problems] for c in names}
    if dataclasses.is_dataclass(first):
        names = [f.name for f in dataclasses.fields(first) if f.name not in ("prompt", "messages")]
        return {c: [getattr(p, c) for p in problems] for c in names}
    return {}


@dataclass(frozen=True)
class _ScoreWith:
    """A task's `score` replaced by a RewardSet over its problems' columns (picklable, for backend ray)."""

    rewards: RewardSet

    def __call__(self, prompts: list[str], completions: list[str], problems: Sequence) -> RewardBreakdown:
        return self.rewards.score(prompts, completions, **problem_columns(problems))


@dataclass(frozen=True)
class _RewardWith:
    score: _ScoreWith

    def __call__(self, prompts: list[str], completions: list[str], problems: Sequence) -> list[float]:
        return self.score(prompts, completions, problems).rewards


def use_rewards(task: Task, rewards: RewardSet) -> Task:
    """`task` with its reward (`score` and `reward`) replaced by `rewards` over the problems' columns."""
    task.rewards = rewards
    task.score = _ScoreWith(rewards)
    task.reward = _RewardWith(task.score)
    return task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[TaskConfig, int], Task]  # (cfg.task, seed) -> the task, deterministic from the seed
    fields: frozenset[str]  # the task.* fields it reads; every other one must keep its default
    description: str = ""
    needs_rewards: bool = False  # no verifier of its own: rl.reward_funcs must name one


TASKS: dict[str, TaskSpec] = {}
COMMON_FIELDS = frozenset({"name", "chat_template", "system_prompt"})  # fields every task honours


def register_task(name: str, fields: Sequence[str] = (), description: str = "", needs_rewards: bool = False):
    """Register the decorated `build(cfg, seed)` as task `name`, reading the task.* `fields`."""
    unknown = set(fields) - set(TaskConfig.model_fields)
    if unknown:
        raise ValueError(f"task {name}: {sorted(unknown)} are not task.* config fields")

    def decorate(build: Callable[[TaskConfig, int], Task]):
        TASKS[name] = TaskSpec(name, build, frozenset(fields) | COMMON_FIELDS, description, needs_rewards)
        return build

    return decorate


def check_task_config(cfg: TaskConfig) -> TaskSpec:
    """The registered task `cfg.name`, after checking that no task.* field it does not read was changed; a
    ConfigError naming the field (and the tasks it applies to) or the near-miss name otherwise."""
    spec = TASKS.get(cfg.name)
    if spec is None:
        near = difflib.get_close_matches(cfg.name, TASKS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"task.name: '{cfg.name}' is not a task{hint}; the tasks are {', '.join(sorted(TASKS))}")
    defaults = TaskConfig.model_fields
    misplaced = []
    for key in defaults:
        if key not in spec.fields and getattr(cfg, key) != defaults[key].default:
            readers = sorted(name for name, other in TASKS.items() if key in other.fields)
            misplaced.append(f"task.{key} applies only to task.name {' or '.join(readers)}, not {cfg.name}")
    if misplaced:
        raise ConfigError("; ".join(misplaced))
    return spec
