"""The `mbpp` task: short Python functions from a description; the reward runs the tests in the sandbox.

Rows as in google-research `mbpp/mbpp.jsonl` (and the Hugging Face `mbpp` "full" config): `task_id`, `text`
(or `prompt`, as in the "sanitized" config), `code` (the reference solution), `test_list` (assert
statements), `test_setup_code`, `challenge_test_list`. The official split is by task_id: 1-10 few-shot
prompts, 11-510 test, 511-600 validation, 601-974 train (Austin et al. 2021; the HF loader uses the same).

The prompt is the paper's: the description and the three asserts, so the model knows the function name. A
completion passes when, run in the sandbox with `test_setup_code`, every assert of `test_list` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.errors import DataError
from posttrain.rewards import RewardSet, code_tests_reward
from posttrain.sandbox import SandboxConfig
from posttrain.tasks.base import DatasetTask
from posttrain.tasks.data import Row, field, load_rows

PROMPT = ("You are an expert Python programmer, and here is your task: {text} "
          "Your code should pass these tests:\n\n{tests}\n")
SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}
Split = Literal["prompt", "test", "validation", "train"]


@dataclass(frozen=True)
class CodeProblem:
    prompt: str
    task_id: int
    text: str
    solution: str  # the reference code (the SFT demonstration)
    test_list: tuple[str, ...]
    test_setup_code: str
    challenge_test_list: tuple[str, ...]
    id: str  # where it came from: "mbpp.jsonl:12" or "mbpp[train] row 3"


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


class MBPPTask(DatasetTask):
    name = "mbpp"

    def __init__(self, path: str | Path | None = None, seed: int = 0, train_split: Split = "train",
                 eval_split: Split = "validation", hf_dataset: str | None = None, hf_config: str | None = "full",
                 sandbox: SandboxConfig = SandboxConfig(timeout_s=5.0), workers: int = 2,
                 partial_credit: bool = False, prompt_template: str = PROMPT):
        """Problems from a JSONL `path` (split by task_id) or a Hugging Face `hf_dataset` (its own splits).
        `sandbox` limits each run, `workers` runs that many at once; `partial_credit` rewards the fraction of
        tests passed instead of all-or-nothing. `seed` is unused (the split is the official one)."""
        for split in (train_split, eval_split):
            if split not in SPLITS:
                raise DataError(f"task mbpp: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.prompt_template, self.sandbox, self.workers = prompt_template, sandbox, workers
        self.partial_credit = partial_credit
        if hf_dataset is not None:
            self.train_problems = self._load(None, hf_dataset, train_split, hf_config)
            self.eval_problems = self._load(None, hf_dataset, eval_split, hf_config)
        else:
            problems = self._load(path, None, "train", None)
            self.train_problems = self._pick(problems, train_split, path)
            self.eval_problems = self._pick(problems, eval_split, path)
        self.rewards = self.reward_set()

    def _load(self, path, hf_dataset, split, hf_config) -> list[CodeProblem]:
        return [self.parse_row(r) for r in load_rows(path, hf_dataset, split, hf_config)]

    @staticmethod
    def _pick(problems: list[CodeProblem], split: str, path) -> list[CodeProblem]:
        picked = [p for p in problems if p.task_id in SPLITS[split]]
        if not picked:
            ids = SPLITS[split]
            raise DataError(f"{path}: no rows with task_id {ids.start}-{ids.stop - 1} (the {split!r} split)")
        return picked

    def parse_row(self, row: Row) -> CodeProblem:
        task_id = field(row, "task_id", int)
        text = field(row, "text" if "text" in row.fields else "prompt")
        code = field(row, "code")
        tests = field(row, "test_list", list)
        challenge = field(row, "challenge_test_list", list, nonempty=False) if "challenge_test_list" in row.fields \
            else []
        setup = field(row, "test_setup_code", nonempty=False) if "test_setup_code" in row.fields else ""
        for name, items in (("test_list", tests), ("challenge_test_list", challenge)):
            if not all(isinstance(t, str) and t.strip() for t in items):
                raise DataError(f"{row.where}: field {name!r} should hold non-empty strings")
        tests = tuple(_lf(t) for t in tests)
        prompt = self.prompt_template.format(text=text.strip(), tests="\n".join(tests))
        return CodeProblem(prompt, task_id, text, _lf(code), tests, _lf(setup), tuple(_lf(t) for t in challenge),
                           row.where)

    def reward_set(self) -> RewardSet:
        return RewardSet({"tests": code_tests_reward(self.sandbox, self.workers, self.partial_credit)})

    def reward_fields(self, problems) -> dict[str, list]:
        return {"test_list": [list(p.test_list) for p in problems],
                "test_setup_code": [p.test_setup_code for p in problems]}
