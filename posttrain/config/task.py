"""`task`: the task a run trains and evaluates on, and where its data comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.sections import _Section, _suggest

MBPP_SPLITS = ("prompt", "test", "validation", "train")  # the official task_id ranges (posttrain/tasks/mbpp.py)


class TaskConfig(_Section):
    """The task: `arithmetic` is generated; `gsm8k`, `math` and `mbpp` read data (task.path or task.hf_dataset)
    and need a model with a subword tokenizer (model.path). A field that does not apply to the chosen task must
    keep its default: each task declares the fields it reads when it registers (posttrain/tasks/registry.py).
    docs/rewards.md describes each task."""

    name: str = Field(
        "arithmetic", description="A registered task (posttrain/tasks/registry.py; a task.* field it does not read "
        "must keep its default). Built in: 'arithmetic' (generated problems, exact-match reward), 'gsm8k' "
        "(word problems, final-number reward), 'math' (competition problems, symbolic answer check), 'mbpp' "
        "(Python functions, tests run in the sandbox), 'ifeval' (generated requests with one IFEval-style "
        "verifiable constraint each; RL only, needs the if-verifiable package).")
    instructions: tuple[str, ...] | None = Field(None, description="ifeval: the IFEval instruction ids to draw "
                                                 "constraints from (None: all eight of posttrain/tasks/"
                                                 "instructions.py).")
    min_operand: int = Field(0, ge=0, description="arithmetic: smallest operand.")
    max_operand: int = Field(99, ge=0, description="arithmetic: largest operand.")
    operators: tuple[Literal["+", "-", "*"], ...] = Field(("+",), min_length=1,
                                                          description="arithmetic: operators to draw from.")
    num_eval: int = Field(500, ge=1, description="arithmetic, gsm8k, math, ifeval: held-out evaluation problems, disjoint "
                          "from training prompts (gsm8k, math: drawn from the training data by a seeded shuffle "
                          "unless task.eval_path or task.hf_eval_split is set).")
    demo_error: Literal["none", "drop_carry", "trailing_period"] = Field(
        "drop_carry", description="arithmetic: systematic mistake in the SFT demonstrations: 'drop_carry' forgets "
        "the carry out of the units digit of an addition (37+58=85), as a hurried human demonstrator might; "
        "'trailing_period' writes the answer with a full stop (37+58=95.), which the exact-match gold rule "
        "(the bare number) rejects.")
    demo_error_rate: float = Field(0.6, ge=0.0, le=1.0, description="arithmetic: fraction of the demonstrations "
                                   "that could contain the mistake which do.")
    path: str | None = Field(None, description="gsm8k, math, mbpp: JSON Lines data file (gsm8k: train.jsonl of "
                             "openai/grade-school-math; math: MATH-500-style rows; mbpp: mbpp.jsonl of "
                             "google-research, split by task_id). None: read task.hf_dataset instead; one of the "
                             "two is required.")
    eval_path: str | None = Field(None, description="gsm8k, math: held-out JSON Lines file (e.g. gsm8k "
                                  "test.jsonl); None: hold out task.num_eval training rows.")
    hf_dataset: str | None = Field(None, description="gsm8k, math, mbpp: a Hugging Face dataset (hub name such as "
                                   "openai/gsm8k, or a local directory of data files) read with `datasets` "
                                   "instead of task.path.")
    hf_config: str | None = Field(None, description="Config name of task.hf_dataset; None: the task's own for a "
                                  "hub name (gsm8k 'main', mbpp 'full', math none), none for a local directory.")
    hf_split: str | None = Field(None, description="gsm8k, math, mbpp: training split; None: the task's default "
                                 "(gsm8k 'train', math 'test', mbpp 'train'). mbpp: one of prompt, test, "
                                 "validation, train, which in task.path also selects that task_id range.")
    hf_eval_split: str | None = Field(None, description="Held-out split (gsm8k, math: of task.hf_dataset; None: "
                                      "hold out task.num_eval training rows. mbpp: as task.hf_split; None: "
                                      "'validation').")
    sandbox_timeout_s: float = Field(5.0, gt=0, description="mbpp: wall-clock limit per program run in the "
                                     "sandbox (interpreter start-up included).")
    workers: int = Field(2, ge=1, description="mbpp: sandboxed programs run at the same time.")
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="'auto': when the model's tokenizer has a chat template, every prompt is rendered "
        "through it as the user's turn with the generation prompt (add_generation_prompt=True), and SFT "
        "demonstrations and preference pairs are trained as the assistant's turn (loss on the answer and its "
        "end-of-turn token only); the tiny character tokenizer has none, so nothing changes there. 'none': "
        "prompts as written. Generation stops at EOS and at the template's end-of-turn token either way.")
    system_prompt: str | None = Field(None, description="With a chat template: a system message put before "
                                      "every prompt. None: none (the template may add its own default).")
    prompt_field: str = Field("prompt", min_length=1, description="custom: the column holding the prompt (text, "
                              "or a list of chat messages); a row without it may have a 'messages' column "
                              "instead (chat format, the last assistant turn being the SFT demonstration).")
    completion_field: str = Field("completion", min_length=1, description="custom: the column holding the SFT "
                                  "demonstration (when 'messages' does not end with the assistant's turn).")

    @model_validator(mode="after")
    def _applies(self) -> "TaskConfig":
        if self.name == "arithmetic" and self.max_operand < self.min_operand:
            raise ValueError(f"task.max_operand ({self.max_operand}) must be >= task.min_operand "
                             f"({self.min_operand})")
        if self.path is not None and self.hf_dataset is not None:
            raise ValueError("task.path and task.hf_dataset are both set; give one data source (set the other "
                             "to null)")
        if self.name == "mbpp":
            for key in ("hf_split", "hf_eval_split"):
                value = getattr(self, key)
                if value is not None and value not in MBPP_SPLITS:
                    raise ValueError(f"task.{key} must be one of {', '.join(MBPP_SPLITS)} for mbpp"
                                     f"{_suggest(value, list(MBPP_SPLITS))}")
        return self
