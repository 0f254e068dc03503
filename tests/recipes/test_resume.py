"""Exact resume inside the training loops: a run that crashes and resumes from its newest checkpoint ends
with the same weights and the same metrics.jsonl (timings aside) as an uninterrupted run, bit for bit."""

import importlib.util
import json

import pytest
import torch

from posttrain.train.metrics import MetricsLogger
from posttrain.models import build_tiny_model
from posttrain.models.adapters import apply_peft
from posttrain.train.control import RunControl, RunDiverged, find_resume_point
from posttrain.rl.roles import InlineRoles
from posttrain.rl.loop import train_rl
from posttrain.recipes.sft import setup_sft, train_sft
from tests.recipes.test_rl import EvenFirstCharTask

TIMING = ("time/", "tokens_per_s")


class Crash(Exception):
    pass


class CrashingLogger(MetricsLogger):
    """Raises after writing its `crash_after`-th line, like a process killed between two steps' work."""

    def __init__(self, path, crash_after, **kw):
        super().__init__(path, **kw)
        self.crash_after = crash_after

    def log(self, record):
        super().log(record)
        if self.lines_written == self.crash_after:
            raise Crash


def strip_timing(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in lines]


def run(cfg, tokenizer, task_cls, recipe, out, crash_after=None, resume=False):
    model = apply_peft(build_tiny_model(cfg.model, tokenizer, seed=0), cfg.model)  # model.peft=lora: the adapter
    torch.manual_seed(0)
    resumed = find_resume_point(out) if resume else None
    offset = resumed.state["metrics_offset"] if resumed else None
    logger = (CrashingLogger(out / "metrics.jsonl", crash_after) if crash_after else
              MetricsLogger(out / "metrics.jsonl", resume_at=offset))
    with logger, RunControl(out, every=2, keep=2, max_skipped=3, logger=logger, resumed=resumed) as ctl:
        task = task_cls(cfg.task, cfg.seed)
        if recipe == "sft":
            train_sft(cfg, setup_sft(cfg, model, tokenizer, task), logger, ctl=ctl)
        else:
            train_rl(cfg, InlineRoles.local(cfg, model, tokenizer, task), task, logger, ctl=ctl)
    return model


PPO = ["rl.advantage=gae", "rl.group_size=1", "rl.prompts_per_step=8", "rl.kl_placement=reward", "rl.kl_estimator=k1",
       "rl.critic_init=policy", "rl.mini_batches=2", "rl.ppo_epochs=2", "rl.ptx_coef=0.1", "rl.ptx_batch_size=4",
       "rl.kl_target=0.5", "rl.kl_horizon=100"]

# model.peft=lora: checkpoints hold the adapter and its optimizer state; the base is rebuilt from the seed
LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.1"]
NEEDS_PEFT = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the test extra)")


@pytest.mark.parametrize("recipe,overrides,crash_after", [
    ("sft", ["sft.steps=7", "sft.log_every=1", "sft.eval_every=3"], 6),
    ("rl", ["rl.steps=5", "rl.eval_every=2"], 4),
    ("rl", ["rl.steps=5", *PPO], 3),
    ("rl", ["rl.steps=5", "rl.dynamic_sampling=true", "rl.mini_batches=2"], 4),
    pytest.param("sft", ["sft.steps=7", "sft.log_every=1", "sft.eval_every=3", *LORA], 6, marks=NEEDS_PEFT),
    pytest.param("rl", ["rl.steps=5", "rl.eval_every=2", "rl.kl_coef=0.1", *LORA], 4, marks=NEEDS_PEFT),
], ids=["sft", "grpo", "ppo-ptx-adaptive-kl", "dapo-dynamic-sampling", "sft-lora", "grpo-lora-kl"])
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, make_config, tokenizer, recipe, overrides, crash_after):
    cfg = make_config(tmp_path, *overrides)
    full = run(cfg, tokenizer, EvenFirstCharTask, recipe, tmp_path / "full")
    with pytest.raises(Crash):
        run(cfg, tokenizer, EvenFirstCharTask, recipe, tmp_path / "crash", crash_after=crash_after)
    assert find_resume_point(tmp_path / "crash") is not None
    resumed = run(cfg, tokenizer, EvenFirstCharTask, recipe, tmp_path / "crash", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert strip_timing(tmp_path / "crash" / "metrics.jsonl") == strip_timing(tmp_path / "full" / "metrics.jsonl")


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_state_saved(tmp_path, make_config, tokenizer):
    cfg = make_config(tmp_path, "sft.steps=10", "sft.log_every=1", "sft.lr=1e30")  # the loss explodes to inf/NaN
    model = build_tiny_model(cfg.model, tokenizer, seed=0)
    out = tmp_path / "run"
    with MetricsLogger(out / "metrics.jsonl") as logger, RunControl(out, 0, 2, 3, logger) as ctl:
        state = setup_sft(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
        with pytest.raises(RunDiverged, match="3 consecutive steps with a non-finite loss"):
            train_sft(cfg, state, logger, ctl=ctl)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN step was applied
    skipped = [r for r in strip_timing(out / "metrics.jsonl") if r.get("skipped")]
    assert len(skipped) == 3
    assert find_resume_point(out).step == skipped[-1]["step"]
