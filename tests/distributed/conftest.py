"""Fixtures for backend ray: a tiny SFT model whose samples earn mixed rewards, and configs sized for 2 CPUs.

The task is arithmetic on operands 0..4 (25 problems, 5 held out): after 60 SFT steps the tiny model answers
about 60% of the training problems greedily, so GRPO groups have unequal rewards and the gradients are real.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import build_config
from tests.conftest import tiny_run_dict

# A GRPO run of 16 sequences per step: two rollout workers and two learner ranks get 8 each.
RAY_TEST = ["task.max_operand=4", "task.num_eval=5", "eval.batch_size=5", "rl.steps=5", "rl.prompts_per_step=4",
            "rl.group_size=4", "rl.max_new_tokens=4", "rl.kl_coef=0.1", "rl.eval_every=0", "backend=ray",
            "ray.cpus=2", "ray.num_rollout_workers=2", "ray.num_learners=2", "ray.num_reward_workers=1",
            "ray.timeout_s=120", "ray.startup_timeout_s=180", "ray.max_restarts=2"]


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    """A tiny model fine-tuned for 60 steps on the 0..4 arithmetic task, saved as a Hugging Face directory."""
    from posttrain.models import build_char_tokenizer, build_tiny_model, save_pretrained
    from posttrain.recipes.sft import setup_sft, train_sft
    from posttrain.tasks import ArithmeticTask

    class _Quiet:
        def log(self, record):
            pass

    cfg = build_config(tiny_run_dict("unused"), ["task.max_operand=4", "task.num_eval=5", "sft.steps=60",
                                                 "sft.batch_size=32", "sft.lr=5e-3"])
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(cfg.model, tokenizer, seed=0)
    before = torch.get_num_threads()
    train_sft(cfg, setup_sft(cfg, model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)), _Quiet())
    torch.set_num_threads(before)
    out = tmp_path_factory.mktemp("sft") / "final"
    save_pretrained(model, tokenizer, out)
    return out


@pytest.fixture(scope="session")
def ray_config():
    """`ray_config(output_dir, model_dir, *overrides)` -> the validated test config for backend ray."""

    def make(output_dir, model_dir, *overrides: str):
        return build_config(tiny_run_dict(output_dir), [*RAY_TEST, f"model.path={model_dir}", *overrides])

    return make
