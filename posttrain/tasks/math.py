"""The `math` task: competition problems (MATH, MATH-500); the reward checks the final answer symbolically.

Rows as in MATH-500 (openai/prm800k `math_splits`, Hugging Face `HuggingFaceH4/MATH-500`): `problem`,
`solution` (LaTeX with a `\\boxed{}` answer), `answer` (the boxed answer), and optionally `unique_id`,
`subject`, `level`. Rows without `answer` (the original Hendrycks MATH) take the last `\\boxed{}` of the
solution. Answers are compared through rewards/math.py: normalisation, then math-verify.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import DataError
from posttrain.rewards import RewardSet, extract_boxed, math_reward
from posttrain.tasks.base import DatasetTask, MathProblem, math_answer_key
from posttrain.tasks.data import Row, field

PROMPT = "{problem}\nLet's think step by step and output the final answer within \\boxed{{}}."


class MathTask(DatasetTask):
    name = "math"
    answer_key = staticmethod(math_answer_key)  # majority voting counts final answers

    def __init__(self, path: str | Path | None = None, seed: int = 0, num_eval: int = 20,
                 eval_path: str | Path | None = None, hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_split: str = "test", hf_eval_split: str | None = None, prompt_template: str = PROMPT):
        """See DatasetTask for the data sources and the split. `prompt_template` gets `{problem}`."""
        self.prompt_template = prompt_template
        super().__init__(path, seed, num_eval, eval_path, hf_dataset, hf_config, hf_split, hf_eval_split)

    def parse_row(self, row: Row) -> MathProblem:
        problem, solution = field(row, "problem"), field(row, "solution")
        answer = row.fields.get("answer")
        if answer is None:
            answer = extract_boxed(solution)
            if answer is None:
                raise DataError(f"{row.where}: no field 'answer' and no \\boxed{{}} answer in 'solution'")
        elif not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{row.where}: field 'answer' should be a non-empty str, got {answer!r}")
        uid = row.fields.get("unique_id")
        return MathProblem(self.prompt_template.format(problem=problem), answer.strip(), problem, solution,
                           uid if isinstance(uid, str) and uid else row.where)

    def reward_set(self) -> RewardSet:
        return RewardSet({"correct": math_reward})

    def reward_fields(self, problems) -> dict[str, list]:
        return {"answer": [p.answer for p in problems]}
