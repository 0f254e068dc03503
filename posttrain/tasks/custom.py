"""The `custom` task: your own rows (a JSONL file or a Hugging Face dataset) and your own reward functions.

    task: {name: custom, path: data/train.jsonl, prompt_field: prompt, num_eval: 64}
    rl:   {reward_funcs: ["my_rewards:exact_match"]}

A row has the prompt in `task.prompt_field` (text, or a list of chat messages `{"role", "content"}`), or a
`messages` column in chat format, whose last turn, when it is the assistant's, is the demonstration SFT learns
(otherwise `task.completion_field`, if the row has it). Every other column reaches the reward functions by name,
as in TRL: a row `{"prompt": "2+2?", "answer": "4"}` calls `fn(prompts, completions, answer=[...])`. The held-out
split is `task.eval_path` / `task.hf_eval_split`, or a seeded `task.num_eval` of the rows. The task's reward is
`rl.reward_funcs` (required: `posttrain.tasks.build_task` attaches them and checks the columns they ask for).
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field

from posttrain.config import TaskConfig
from posttrain.errors import DataError
from posttrain.tasks.base import DatasetTask
from posttrain.tasks.data import Row, field
from posttrain.tasks.registry import problem_columns


@dataclass(frozen=True)
class CustomProblem:
    prompt: str  # the prompt text (chat messages joined by newlines until the chat template renders them)
    columns: dict = dc_field(default_factory=dict)  # every other column of the row, for the reward functions
    completion: str | None = None  # the demonstration, for SFT
    messages: tuple | None = None  # the prompt as chat messages, when the row gave them
    id: str = ""  # "train.jsonl:12"


def _messages(row: Row, name: str) -> list[dict]:
    value = field(row, name, list)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: field {name!r}[{i}] should be a message {{'role': ..., 'content': ...}}")
    return value


class CustomTask(DatasetTask):
    name = "custom"

    def __init__(self, cfg: TaskConfig, seed: int):
        self.prompt_field, self.completion_field = cfg.prompt_field, cfg.completion_field
        super().__init__(cfg.path, seed, cfg.num_eval, cfg.eval_path, cfg.hf_dataset, cfg.hf_config,
                         cfg.hf_split or "train", cfg.hf_eval_split)
        self.columns = sorted(set().union(*(p.columns for p in (*self.train_problems, *self.eval_problems))))

    def parse_row(self, row: Row) -> CustomProblem:
        completion, messages = None, None
        if self.prompt_field in row.fields:
            value = row.fields[self.prompt_field]
            if isinstance(value, list):
                messages = _messages(row, self.prompt_field)
            else:
                prompt = field(row, self.prompt_field)
        elif "messages" in row.fields:
            messages = _messages(row, "messages")
            if messages[-1]["role"] == "assistant":
                completion, messages = messages[-1]["content"], messages[:-1]
            if not messages:
                raise DataError(f"{row.where}: field 'messages' has no turn before the assistant's")
        else:
            raise DataError(f"{row.where}: missing field {self.prompt_field!r} (task.prompt_field), and no "
                            "'messages' column")
        if messages is not None:
            prompt = "\n".join(m["content"] for m in messages)
        if completion is None and self.completion_field in row.fields:
            completion = field(row, self.completion_field)
        skip = {self.prompt_field, "messages"}
        columns = {k: v for k, v in row.fields.items() if k not in skip}
        return CustomProblem(prompt, columns, completion, tuple(messages) if messages else None, row.where)

    def reward_set(self):
        return None  # rl.reward_funcs, attached by build_task (posttrain/tasks/registry.py: use_rewards)

    def reward_fields(self, problems) -> dict[str, list]:
        return problem_columns(problems)

    def demonstration(self, problem: CustomProblem, rng) -> str:
        if problem.completion is None:
            raise DataError(f"{problem.id}: no demonstration for SFT: the row has no {self.completion_field!r} "
                            "column (task.completion_field) and no assistant turn at the end of 'messages'")
        return problem.completion
