"""Selecting a task from the config: build_task for every name, from samples of the real data files and from small
JSONL files; one-line data errors; fit_task's tokenizer check and its policy for prompts longer than the context."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from tests.tasks.conftest import (GSM8K, GSM8K_ROWS, GSM8K_SAMPLE_ROWS, MATH500, MATH_ROWS, MBPP, MBPP_ROWS,
                                  MBPP_TEST_IDS, MBPP_TRAIN_IDS, MBPP_VALIDATION_IDS, write_jsonl)
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import build_config
from posttrain.errors import ConfigError, DataError, ModelLoadError
from posttrain.models import build_char_tokenizer
from posttrain.tasks import ArithmeticTask, build_task, context_length, fit_task
from posttrain.tasks.gsm8k import GSM8KTask
from posttrain.tasks.math import MathTask
from posttrain.tasks.mbpp import MBPPTask


def task_of(*overrides: str, seed: int = 0):
    return build_task(build_config(overrides=list(overrides)).task, seed)


def test_arithmetic_is_still_the_default():
    task = task_of()
    assert isinstance(task, ArithmeticTask) and len(task.eval_problems) == 500


def test_gsm8k_from_the_sample_file():
    task = task_of("task.name=gsm8k", f"task.path={GSM8K}", "task.num_eval=100")
    assert isinstance(task, GSM8KTask)
    # The sample's 201 rows, not the full file's 7473 (tests/data/samples/gsm8k/SOURCE.md).
    assert (len(task.train_problems), len(task.eval_problems)) == (GSM8K_SAMPLE_ROWS - 100, 100)


def test_math_from_the_sample_file():
    task = task_of("task.name=math", f"task.path={MATH500}", "task.num_eval=20")
    assert isinstance(task, MathTask) and (len(task.train_problems), len(task.eval_problems)) == (80, 20)
    assert all(p.answer for p in task.eval_problems)


def test_mbpp_from_the_sample_file_with_its_official_splits():
    # The sample keeps some rows of each split (all 90 validation rows), not the full file's 374 train and 500 test.
    task = task_of("task.name=mbpp", f"task.path={MBPP}")
    assert isinstance(task, MBPPTask)
    assert (len(task.train_problems), len(task.eval_problems)) == (len(MBPP_TRAIN_IDS), len(MBPP_VALIDATION_IDS)) \
        == (51, 90)
    test = task_of("task.name=mbpp", f"task.path={MBPP}", "task.hf_split=validation", "task.hf_eval_split=test")
    assert {p.task_id for p in test.train_problems} == MBPP_VALIDATION_IDS
    assert {p.task_id for p in test.eval_problems} == MBPP_TEST_IDS


def test_small_jsonl_files_for_each_task(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    held = write_jsonl(tmp_path / "held.jsonl", GSM8K_ROWS[:3])
    task = task_of("task.name=gsm8k", f"task.path={gsm}", "task.num_eval=2")
    assert (len(task.train_problems), len(task.eval_problems)) == (6, 2)
    assert task_of("task.name=gsm8k", f"task.path={gsm}", "task.num_eval=2", seed=1).eval_problems != \
        task.eval_problems
    task = task_of("task.name=gsm8k", f"task.path={gsm}", f"task.eval_path={held}")
    assert (len(task.train_problems), len(task.eval_problems)) == (8, 3)
    task = task_of("task.name=math", f"task.path={write_jsonl(tmp_path / 'math.jsonl', MATH_ROWS)}", "task.num_eval=2")
    assert (len(task.train_problems), len(task.eval_problems)) == (4, 2)
    problem = task.eval_problems[0]
    assert task.reward([problem.prompt], [problem.solution], [problem]) == [1.0]


def test_mbpp_settings_reach_the_sandbox(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    task = task_of("task.name=mbpp", f"task.path={path}", "task.sandbox_timeout_s=2.5", "task.workers=3",
                   "task.hf_eval_split=prompt")
    assert (task.sandbox.timeout_s, task.workers) == (2.5, 3)
    assert [p.task_id for p in task.train_problems] == [601, 602, 603, 604]
    assert [p.task_id for p in task.eval_problems] == [2, 3]
    problems = task.train_problems
    right = [task.demonstration(p, random.Random(0)) for p in problems]
    assert task.reward([p.prompt for p in problems] * 2, right + ["def f(:"] * 4, problems * 2) == [1.0] * 4 + [0.0] * 4
    # The sandbox pool lives for one batch: nothing is left running that a run would have to shut down.
    assert not [t for t in threading.enumerate() if t.name.startswith("sandbox")]


def test_hugging_face_dataset_from_a_local_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "gsm8k_local"
    data.mkdir()
    write_jsonl(data / "train.jsonl", GSM8K_ROWS)
    write_jsonl(data / "test.jsonl", GSM8K_ROWS[:2])
    # hf_config unset: a local directory gets no config name (gsm8k's own, 'main', is for the hub dataset).
    task = task_of("task.name=gsm8k", f"task.hf_dataset={data}", "task.hf_eval_split=test")
    assert (len(task.train_problems), len(task.eval_problems)) == (8, 2)
    assert task.eval_problems[0].id == f"{data}[test] row 0"


def test_no_data_source_asks_for_task_path():
    with pytest.raises(DataError, match=r"task gsm8k has no data: set task\.path .* or task\.hf_dataset") as err:
        task_of("task.name=gsm8k")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["gsm8k", "math", "mbpp"])
def test_missing_file_is_a_data_error_naming_it(tmp_path, name):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        task_of(f"task.name={name}", f"task.path={tmp_path / 'missing.jsonl'}")


def test_malformed_row_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GSM8K_ROWS[:3] + ['{"question": "q"}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:4: missing field 'answer'"):
        task_of("task.name=gsm8k", f"task.path={path}", "task.num_eval=1")


# fit_task: run before every sft/rm/rl run (posttrain/train/run.py start_run).

@pytest.fixture(scope="module")
def hf_model(hf_model_dir):
    return AutoModelForCausalLM.from_pretrained(hf_model_dir), AutoTokenizer.from_pretrained(hf_model_dir)


def data_config(path, *overrides: str):
    return build_config(overrides=["task.name=gsm8k", f"task.path={path}", "task.num_eval=2", "model.path=some/dir",
                                   "rl.prompts_per_step=2", *overrides])


def test_fit_task_keeps_every_prompt_that_fits(tmp_path, hf_model):
    cfg = data_config(write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS), "rl.max_new_tokens=256")
    task = build_task(cfg.task, 0)
    train, held = task.train_problems, task.eval_problems
    assert context_length(hf_model[0]) == 1024
    assert fit_task(task, cfg, *hf_model, min_train=2) == 0
    assert task.train_problems is train and task.eval_problems is held


def test_prompts_longer_than_the_context_are_dropped_and_counted(tmp_path, hf_model, caplog):
    model, tokenizer = hf_model
    long_row = {"question": "Tom counts apples. " * 40 + "How many?", "answer": "#### 1"}
    cfg = data_config(write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS + [long_row] * 3), "task.num_eval=3",
                      "rl.max_new_tokens=900", "eval.max_new_tokens=16")
    task = build_task(cfg.task, 0)
    assert max(len(ids) for ids in tokenizer([p.prompt for p in task.train_problems])["input_ids"]) + 900 > 1024
    with caplog.at_level(logging.WARNING, logger="posttrain.tasks"):
        dropped = fit_task(task, cfg, model, tokenizer, min_train=2)
    assert dropped == 3 and len(task.train_problems) + len(task.eval_problems) == 8
    assert set(task.dropped_prompts) == {"training", "held-out"} and sum(task.dropped_prompts.values()) == 3
    assert all("counts apples" not in p.prompt for p in task.train_problems + task.eval_problems)
    assert "task gsm8k: dropped" in caplog.text and "context of 1024 tokens" in caplog.text
    too_few = build_task(cfg.task, 0)
    with pytest.raises(DataError, match=r"training problems left \(need 100\)"):
        fit_task(too_few, cfg, model, tokenizer, min_train=100)
    nothing = build_task(data_config(tmp_path / "gsm.jsonl", "task.num_eval=3", "rl.max_new_tokens=1020").task, 0)
    with pytest.raises(DataError, match=r"task gsm8k: 0 training problems left"):
        fit_task(nothing, data_config(tmp_path / "gsm.jsonl", "rl.max_new_tokens=1020"), model, tokenizer)


def test_a_data_task_without_model_path_asks_for_one(tmp_path, tiny_model, tokenizer):
    cfg = build_config(overrides=["task.name=gsm8k", f"task.path={write_jsonl(tmp_path / 'g.jsonl', GSM8K_ROWS)}",
                                  "task.num_eval=2"])
    with pytest.raises(ConfigError, match=r"^task gsm8k needs a tokenizer that covers its text; set model\.path to a "
                                          r"Hugging Face model directory$"):
        fit_task(build_task(cfg.task, 0), cfg, tiny_model, tokenizer)


def test_a_tokenizer_that_cannot_encode_the_prompts_is_rejected(tmp_path, tiny_model):
    rows = GSM8K_ROWS + [{"question": "A pen costs 3 €. What do 2 pens cost?", "answer": "#### 6"}]
    cfg = data_config(write_jsonl(tmp_path / "g.jsonl", rows), "rl.max_new_tokens=4", "eval.max_new_tokens=4")
    task = build_task(cfg.task, 0)
    tiny_model.config.max_position_embeddings = 1024
    with pytest.raises(ModelLoadError, match=r"task gsm8k needs a tokenizer that covers its text; set model\.path .*"
                                          r"1 of 9 prompts contain text its tokenizer maps to '<unk>', the first "
                                          r"from .*g\.jsonl:9\)"):
        fit_task(task, cfg, tiny_model, build_char_tokenizer())


def test_arithmetic_with_the_character_tokenizer_is_unchanged(tiny_model, tokenizer):
    cfg = build_config(overrides=["task.max_operand=20", "task.num_eval=20", "rl.prompts_per_step=4"])
    task = build_task(cfg.task, 0)
    before = (list(task.train_problems), list(task.eval_problems))
    assert fit_task(task, cfg, tiny_model, tokenizer, min_train=4) == 0
    assert (task.train_problems, task.eval_problems) == before


def test_a_new_task_is_one_class_and_one_registration(tmp_path):
    """A task registered from outside the package: build_task finds it, its fields are checked, and the RL
    loop trains on it (the reward is only its `reward`: no breakdown needed)."""
    import random

    from posttrain.config import build_config
    from posttrain.errors import ConfigError
    from posttrain.models import load_policy
    from posttrain.rl.loop import RLRun
    from posttrain.tasks import TASKS, Task, build_task, register_task
    from posttrain.tasks.arithmetic import Problem

    class OddLength(Task):
        name = "odd_length"

        def __init__(self, seed, n):
            rng = random.Random(seed)
            problems = [Problem(f"{a}+{b}=", str(a + b), a, "+", b) for a, b in ((rng.randrange(9), rng.randrange(9))
                                                                       for _ in range(n))]
            self.train_problems, self.eval_problems = problems[8:], problems[:8]

        def reward(self, prompts, completions, problems):
            return [float(len(c) % 2) for c in completions]

        def sample_prompts(self, rng, n):
            return rng.sample(self.train_problems, n)

        def demonstration(self, problem, rng):
            return "1"

    register_task("odd_length", fields=("num_eval",))(lambda cfg, seed: OddLength(seed, cfg.num_eval))
    try:
        cfg = build_config(overrides=["task.name=odd_length", "task.num_eval=40", "rl.prompts_per_step=4",
                                      "rl.group_size=4", "rl.max_new_tokens=4", "model.hidden_size=32",
                                      "model.num_layers=1", "model.intermediate_size=64"])
        task = build_task(cfg.task, cfg.seed)
        assert isinstance(task, Task) and len(task.train_problems) == 32
        with pytest.raises(ConfigError, match="task.max_operand applies only to task.name arithmetic, not "
                                              "odd_length"):
            build_task(build_config(overrides=["task.name=odd_length", "task.max_operand=5"]).task, 0)
        model, tokenizer = load_policy(cfg.model, seed=0)
        metrics = RLRun.local(cfg, model, tokenizer, task).step()
        assert 0 <= metrics["reward_mean"] <= 1 and "reward/errors" not in metrics
    finally:
        TASKS.pop("odd_length", None)
