"""The `gsm8k` task: grade-school word problems; the reward checks the final number.

Rows as in openai/grade-school-math (and the Hugging Face `openai/gsm8k` "main" config): `question`, and
`answer`, a worked solution whose last line is `#### <number>`. The gold answer is that number; the whole
`answer` text is the SFT demonstration. The prompt asks for the final answer after "####", which the checker
reads first (it also accepts a `\\boxed{}`, "the answer is ...", or the last number; see rewards/math.py).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import DataError
from posttrain.rewards import RewardSet, math_reward
from posttrain.rewards.math import extract_hashes, normalize_answer, number_value
from posttrain.tasks.base import DatasetTask, MathProblem, math_answer_key
from posttrain.tasks.data import Row, field

PROMPT = "{question}\nLet's think step by step and output the final answer after \"####\"."


class GSM8KTask(DatasetTask):
    name = "gsm8k"
    answer_key = staticmethod(math_answer_key)  # majority voting counts final answers

    def __init__(self, path: str | Path | None = None, seed: int = 0, num_eval: int = 500,
                 eval_path: str | Path | None = None, hf_dataset: str | None = None, hf_config: str | None = "main",
                 hf_split: str = "train", hf_eval_split: str | None = None, prompt_template: str = PROMPT):
        """See DatasetTask for the data sources and the split. `prompt_template` gets `{question}`."""
        self.prompt_template = prompt_template
        super().__init__(path, seed, num_eval, eval_path, hf_dataset, hf_config if hf_dataset else None, hf_split,
                         hf_eval_split)

    def parse_row(self, row: Row) -> MathProblem:
        question, solution = field(row, "question"), field(row, "answer")
        gold = extract_hashes(solution)
        if gold is None:
            raise DataError(f"{row.where}: field 'answer' has no final '#### <number>' line")
        if number_value(normalize_answer(gold)) is None:
            raise DataError(f"{row.where}: final answer {gold!r} after '####' is not a number")
        return MathProblem(self.prompt_template.format(question=question), gold, question, solution, row.where)

    def reward_set(self) -> RewardSet:
        return RewardSet({"correct": math_reward})

    def reward_fields(self, problems) -> dict[str, list]:
        return {"answer": [p.answer for p in problems]}
