"""Tasks by name: the protocol every task implements and the registry `build_task` reads.

A new task is one module (a class with the methods of `Task`) and one registration:

    @register_task("mytask", fields=("path", "num_eval"), description="...")
    def build_mytask(cfg: TaskConfig, seed: int) -> Task:
        return MyTask(cfg.path, seed, cfg.num_eval)

`fields` names the `task.*` config fields the task reads; a config that sets any other task field away from its
default is refused with one line naming the field and the tasks it applies to (`check_task_config`).
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from posttrain.config import TaskConfig
from posttrain.errors import ConfigError
from posttrain.rewards.base import RewardBreakdown


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


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[TaskConfig, int], Task]  # (cfg.task, seed) -> the task, deterministic from the seed
    fields: frozenset[str]  # the task.* fields it reads; every other one must keep its default
    description: str = ""


TASKS: dict[str, TaskSpec] = {}
COMMON_FIELDS = frozenset({"name", "chat_template", "system_prompt"})  # fields every task honours


def register_task(name: str, fields: Sequence[str] = (), description: str = ""):
    """Register the decorated `build(cfg, seed)` as task `name`, reading the task.* `fields`."""
    unknown = set(fields) - set(TaskConfig.model_fields)
    if unknown:
        raise ValueError(f"task {name}: {sorted(unknown)} are not task.* config fields")

    def decorate(build: Callable[[TaskConfig, int], Task]):
        TASKS[name] = TaskSpec(name, build, frozenset(fields) | COMMON_FIELDS, description)
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
