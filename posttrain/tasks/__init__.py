"""Built-in tasks: prompts, a verifiable reward, demonstrations for SFT and a held-out evaluation split.

    task = build_task(cfg.task, seed)                  # the registered task cfg.task.name (registry.py)
    fit_task(task, cfg, model, tokenizer, min_train)   # before a run: prompts rendered with the chat template
                                                       # (a chat model), the tokenizer covers them, and
                                                       # prompts the model's context cannot hold are dropped

The data tasks (gsm8k, math, mbpp) are imported only when asked for: they pull in math-verify and the sandbox.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from posttrain.config import RunConfig, TaskConfig
from posttrain.errors import ConfigError, DataError, ModelLoadError
from posttrain.models.chat import encode_texts, render_prompt, uses_chat_template
from posttrain.tasks.arithmetic import ArithmeticTask, Problem, exact_match_reward
from posttrain.tasks.registry import TASKS, Task, check_task_config, problem_columns, register_task, use_rewards

__all__ = ["TASKS", "ArithmeticTask", "Problem", "Task", "build_task", "context_length", "exact_match_reward",
           "fit_task", "register_task"]

log = logging.getLogger(__name__)

# Where each data task's rows come from, for the error that asks for them.
_SOURCES = {
    "gsm8k": ("train.jsonl of github.com/openai/grade-school-math", "openai/gsm8k"),
    "math": ("MATH-500's test.jsonl from github.com/openai/prm800k", "HuggingFaceH4/MATH-500"),
    "mbpp": ("mbpp.jsonl of github.com/google-research/google-research/tree/master/mbpp",
             "google-research-datasets/mbpp"),
}
_DATA = ("path", "hf_dataset", "hf_config", "hf_split", "hf_eval_split")


def build_task(cfg: TaskConfig, seed: int, reward_funcs=(), reward_weights=None) -> Task:
    """The task named by `cfg.name` (the registry, posttrain/tasks/registry.py), deterministic from `seed`. A
    task.* field the task does not read, a data task's missing file or malformed row: a one-line error naming
    the field, or the file and line (or the dataset and row).

    `reward_funcs` (rl.reward_funcs: specs, posttrain/rewards/resolve.py) replace the task's reward with their
    weighted sum, given the problems' columns by name; a function that asks for a column the task's problems do
    not have is a ConfigError here, before any model loads."""
    spec = check_task_config(cfg)
    if spec.needs_rewards and not reward_funcs:
        raise ConfigError(f"task {cfg.name} has no reward of its own: set rl.reward_funcs, e.g. "
                          "[\"my_rewards:exact_match\"] (a function fn(prompts, completions, **columns))")
    from posttrain.rewards.resolve import require_columns, resolve_rewards  # noqa: PLC0415

    rewards = resolve_rewards(reward_funcs, reward_weights) if reward_funcs else None  # before reading data
    task = spec.build(cfg, seed)
    if rewards is not None:
        where = cfg.path or cfg.hf_dataset or f"task {cfg.name}"
        columns = getattr(task, "columns", None) or list(problem_columns(task.train_problems[:1]))
        require_columns(rewards, columns, where)
        use_rewards(task, rewards)
    return task


def _data_source(cfg: TaskConfig) -> dict:
    """The keyword arguments of a data task's source (task.path is passed on its own)."""
    if cfg.path is None and cfg.hf_dataset is None:
        file, hub = _SOURCES[cfg.name]
        raise DataError(f"task {cfg.name} has no data: set task.path to a JSON Lines file (e.g. {file}) or "
                        f"task.hf_dataset to a Hugging Face dataset (e.g. {hub})")
    source: dict = {}
    if cfg.hf_dataset is not None:
        source["hf_dataset"] = cfg.hf_dataset
        if cfg.hf_config is not None or Path(cfg.hf_dataset).is_dir():  # a local directory has no named config
            source["hf_config"] = cfg.hf_config
    return source


@register_task("arithmetic", fields=("min_operand", "max_operand", "operators", "demo_error", "demo_error_rate",
                                     "num_eval"), description="generated problems, exact-match reward")
def _arithmetic(cfg: TaskConfig, seed: int) -> Task:
    return ArithmeticTask(cfg, seed)


@register_task("ifeval", fields=("instructions", "num_eval"), description="generated requests with one "
               "IFEval-style verifiable constraint each; RL only (the if-verifiable package)")
def _ifeval(cfg: TaskConfig, seed: int) -> Task:
    from posttrain.tasks.instructions import InstructionsTask  # noqa: PLC0415 (if-verifiable)

    return InstructionsTask(seed, cfg.num_eval, list(cfg.instructions) if cfg.instructions else None)


@register_task("mbpp", fields=(*_DATA, "sandbox_timeout_s", "workers"), description="Python functions, tests "
               "run in the sandbox")
def _mbpp(cfg: TaskConfig, seed: int) -> Task:
    from posttrain.sandbox import SandboxConfig  # noqa: PLC0415 (the sandbox)
    from posttrain.tasks.mbpp import MBPPTask  # noqa: PLC0415

    source = _data_source(cfg)
    splits = {k: v for k, v in (("train_split", cfg.hf_split), ("eval_split", cfg.hf_eval_split)) if v}
    return MBPPTask(cfg.path, seed, sandbox=SandboxConfig(timeout_s=cfg.sandbox_timeout_s), workers=cfg.workers,
                    **splits, **source)


def _math_task(task_class):
    def build(cfg: TaskConfig, seed: int) -> Task:
        source = _data_source(cfg)
        splits = {k: v for k, v in (("hf_split", cfg.hf_split), ("hf_eval_split", cfg.hf_eval_split)) if v}
        return task_class()(cfg.path, seed, num_eval=cfg.num_eval, eval_path=cfg.eval_path, **splits, **source)
    return build


@register_task("custom", fields=(*_DATA, "eval_path", "num_eval", "prompt_field", "completion_field"),
               description="your rows (task.path or task.hf_dataset) and your reward functions (rl.reward_funcs)",
               needs_rewards=True)
def _custom(cfg: TaskConfig, seed: int) -> Task:
    from posttrain.tasks.custom import CustomTask  # noqa: PLC0415

    if cfg.path is None and cfg.hf_dataset is None:
        raise DataError("task custom has no data: set task.path to a JSON Lines file (one object per line, e.g. "
                        "{\"prompt\": ..., \"answer\": ...}) or task.hf_dataset to a Hugging Face dataset")
    return CustomTask(cfg, seed)


def _gsm8k_class():
    from posttrain.tasks.gsm8k import GSM8KTask  # noqa: PLC0415 (math-verify)

    return GSM8KTask


def _math_class():
    from posttrain.tasks.math import MathTask  # noqa: PLC0415 (math-verify)

    return MathTask


register_task("gsm8k", fields=(*_DATA, "eval_path", "num_eval"), description="word problems, final-number "
              "reward")(_math_task(_gsm8k_class))
register_task("math", fields=(*_DATA, "eval_path", "num_eval"), description="competition problems, symbolic "
              "answer check")(_math_task(_math_class))


def context_length(model) -> int | None:
    """The model's context window in tokens, from its HF config (None if the config does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_task(task, cfg: RunConfig, model, tokenizer, min_train: int = 1) -> int:
    """Check, before a run, that the task can be fed to this model; drop the problems it cannot hold.

    0. With a chat model (task.chat_template 'auto' and a tokenizer with a template), every problem's prompt is
       replaced by its rendering through the template (`posttrain.models.chat.render_prompt`: task.system_prompt,
       the prompt as the user's turn, the generation prompt); every recipe reads `problem.prompt`, so RL, SFT,
       evaluation, best-of-n and RFT all see the rendered text. Without a template nothing changes.
    1. A data task needs a real tokenizer. model.path unset (the tiny model's character tokenizer) is a one-line
       ConfigError; a tokenizer that fails on a prompt, or maps any prompt text to its unknown token, a one-line
       ModelLoadError.
    2. A problem whose prompt (special tokens included) plus the longest generation the run asks for
       (max(rl.max_new_tokens, eval.max_new_tokens)) exceeds the model's context is dropped from its split, and
       the count is logged (as verl's `filter_overlong_prompts`); none left to train or evaluate on, or fewer
       than `min_train` training problems (rl.prompts_per_step for RL), is a one-line DataError.

    Returns the number of problems dropped, and records it per split as `task.dropped_prompts` (the runs'
    summary.json reports it). The task's lists are replaced only when something is dropped.
    """
    name = task.name
    needs = (f"task {name} needs a tokenizer that covers its text; set model.path to a Hugging Face model "
             f"directory")
    if name != "arithmetic" and cfg.model.path is None:
        raise ConfigError(needs)
    if uses_chat_template(tokenizer, cfg.task.chat_template):
        chat = lambda p: replace(p, prompt=render_prompt(  # noqa: E731 (a custom row's chat messages as given)
            tokenizer, list(getattr(p, "messages", None) or ()) or p.prompt, cfg.task.system_prompt))
        task.train_problems = [chat(p) for p in task.train_problems]
        task.eval_problems = [chat(p) for p in task.eval_problems]
    splits = {"training": list(task.train_problems), "held-out": list(task.eval_problems)}
    everything = _encoded_lengths(tokenizer, splits["training"] + splits["held-out"], needs)
    n_train = len(splits["training"])
    lengths = {"training": everything[:n_train], "held-out": everything[n_train:]}
    context = context_length(model)
    reserve = max(cfg.rl.max_new_tokens, cfg.eval.max_new_tokens)
    kept = {split: [p for p, n in zip(problems, lengths[split], strict=True)
                    if context is None or n + reserve <= context] for split, problems in splits.items()}
    dropped = {split: len(splits[split]) - len(kept[split]) for split in splits}
    task.dropped_prompts = dropped
    why = (f"whose prompt plus {reserve} new tokens (max of rl.max_new_tokens and eval.max_new_tokens) does not fit "
           f"the model's context of {context} tokens")
    for split, floor in (("training", min_train), ("held-out", 1)):
        if len(kept[split]) < floor:
            need = " for rl.prompts_per_step" if split == "training" and floor == cfg.rl.prompts_per_step > 1 else ""
            after = (f" after dropping {dropped[split]} {why}; use a model with a longer context or fewer new tokens"
                     if dropped[split] else "")
            raise DataError(f"task {name}: {len(kept[split])} {split} problems left (need {floor}{need}){after}")
    if any(dropped.values()):  # after the checks above, so that a fatal case prints its one error line only
        log.warning("task %s: dropped %s problems %s", name,
                    " and ".join(f"{dropped[s]} of {len(splits[s])} {s}" for s in splits), why)
        task.train_problems, task.eval_problems = kept["training"], kept["held-out"]
    return sum(dropped.values())


def _encoded_lengths(tokenizer, problems, needs: str) -> list[int]:
    """Token count of each problem's prompt as the recipes encode it (`encode_texts`: special tokens added);
    ModelLoadError `needs` if the tokenizer fails on a prompt or maps any of its text to the unknown token."""
    prompts = [p.prompt for p in problems]
    try:
        encoded = encode_texts(tokenizer, prompts)
        unk = tokenizer.unk_token_id
        baseline = tokenizer("", add_special_tokens=True)["input_ids"].count(unk) if unk is not None else 0
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means the same thing to the user
        raise ModelLoadError(f"{needs} (the tokenizer failed on a prompt: {type(exc).__name__}: {exc})") from None
    if unk is not None:
        bad = [p for p, ids in zip(problems, encoded, strict=True) if ids.count(unk) > baseline]
        if bad:
            where = getattr(bad[0], "id", bad[0].prompt[:40])
            raise ModelLoadError(f"{needs} ({len(bad)} of {len(prompts)} prompts contain text its tokenizer maps "
                                 f"to {tokenizer.unk_token!r}, the first from {where})")
    return [len(ids) for ids in encoded]
