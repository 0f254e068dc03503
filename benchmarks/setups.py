"""Identical settings for posttrain and TRL (issue 8): the tiny Llama, the arithmetic prompts, the run configs,
and the TRL trainers built to match them. Imported by bench.py and by its subprocess workers.

Every difference between the two sides that we know of is listed in DIFFERENCES (printed in RESULTS.md).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from posttrain.config import ModelConfig, RunConfig, build_config

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"  # SFT checkpoint and model directories, made once (gitignored)
THREADS = 2
# The tiny Llama: hidden 128, 4 layers, 4 heads (no grouped-query attention), intermediate 512, fp32.
MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 512,
         "max_position_embeddings": 128}
LR = 5e-4
KL = 0.01  # GRPO: k3 KL penalty in the loss (TRL beta)
PPO_KL = 0.05  # PPO: k1 KL penalty in the reward (TRL 1.12's default kl_coef)

DIFFERENCES = [
    "Prompts all have two-digit operands (task.min_operand 10), so every prompt has the same length and nothing is "
    "left-padded: TRL 1.16's GRPO training forward passes no position_ids, so a left-padded prompt would get "
    "positions shifted from the ones generation used (its first-step KL to the reference was ~2 with padding).",
    "TRL computes the reward in its own process step from decoded text, as posttrain does; both use the same "
    "exact-match function.",
    "PPO: TRL 1.12 trains policy and value model with one optimizer on pg_loss + vf_coef * vf_loss (one backward); "
    "posttrain steps the critic with its own optimizer (two backwards of the same total size).",
    "PPO: posttrain's reward model re-encodes decoded text with its own tokenizer (it need not share the policy's "
    "vocabulary); TRL feeds the policy's token ids to the reward model.",
    "Both use fused AdamW (TRL: Trainer's default `adamw_torch_fused`; posttrain: torch.optim.AdamW(fused=True)) "
    "with betas (0.9, 0.95), eps 1e-8, no weight decay and a constant learning rate.",
]


def tokenizer():
    from posttrain.models import build_char_tokenizer

    return build_char_tokenizer()


def model_cfg(path: str | None = None) -> ModelConfig:
    return ModelConfig(path=path, **MODEL)


def base_model(seed: int = 0):
    from posttrain.models import build_tiny_model

    return build_tiny_model(model_cfg(), tokenizer(), seed=seed).eval()


def saved_model(name: str, seed: int = 0) -> Path:
    """The tiny policy saved as an HF directory (TRL's reference model is loaded from a path)."""
    out = CACHE / name
    if not (out / "config.json").is_file():
        from posttrain.models import save_pretrained

        save_pretrained(base_model(seed), tokenizer(), out)
    return out


def saved_scalar_model(name: str = "rm", seed: int = 1) -> Path:
    """A tiny one-label sequence-classification model of the same size (reward model and critic for PPO)."""
    out = CACHE / name
    if not (out / "config.json").is_file():
        from posttrain.models.value import build_scalar_model

        model = build_scalar_model(model_cfg(), tokenizer(), seed=seed)
        torch.nn.init.normal_(model.score.weight, std=0.02)  # a non-zero reward model
        model.config.architectures = ["LlamaForSequenceClassification"]
        model.save_pretrained(out, safe_serialization=True)
        tokenizer().save_pretrained(out)
    return out


def run_config(out_dir, model_path: str | None = None, **rl) -> RunConfig:
    """posttrain's config: GRPO on arithmetic by default, `rl` keys override."""
    rl_cfg = {"steps": 1000, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 8, "lr": LR,
              "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "advantage": "grpo",
              "policy_loss": "ppo_clip", "loss_agg": "token-mean", "clip_eps_low": 0.2, "clip_eps_high": 0.2,
              "kl_coef": KL, "kl_estimator": "k3", "kl_placement": "loss", "ppo_epochs": 1, "mini_batches": 1,
              "temperature": 1.0, "top_k": 0, "top_p": 1.0, "eval_every": 0, **rl}
    return build_config({"seed": 0, "output_dir": str(out_dir), "threads": THREADS, "progress": False,
                         "model": {**MODEL, "path": model_path}, "task": {"num_eval": 200, "min_operand": 10},
                         "eval": {"batch_size": 200, "max_new_tokens": 6}, "rl": rl_cfg}, [])


def task(cfg: RunConfig):
    from posttrain.tasks import build_task

    return build_task(cfg.task, cfg.seed)


def posttrain_rl(cfg: RunConfig, model):
    """(state, step): a set-up RL state on `model` and a function running one step."""
    from posttrain.rl.loop import RLRun
    from posttrain.train.optim import PhaseTimer

    run = RLRun.local(cfg, model, tokenizer(), task(cfg))
    timer = PhaseTimer()

    def step() -> dict:
        metrics = run.step(timer)
        metrics.update(timer.pop())
        return metrics

    return run, step


class StepClock:
    """A TRL callback timing each optimizer step as the time between on_step_end calls, minus whatever
    `between(trainer_model)` (run at each step end: the interleaved posttrain step, an evaluation) took."""

    def __init__(self, between=None):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.resume = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kw):
                clock.steps.append(time.perf_counter() - clock.resume)
                if clock.between is not None and clock.between(model, state.global_step):
                    control.should_training_stop = True
                clock.resume = time.perf_counter()

        self.steps: list[float] = []
        self.between = between
        self.resume = time.perf_counter()
        self.callback = _CB()


def grpo_dataset(cfg: RunConfig):
    from datasets import Dataset

    t = task(cfg)
    return Dataset.from_dict({"prompt": [p.prompt for p in t.train_problems],
                              "answer": [p.answer for p in t.train_problems]})


def exact_match(prompts, completions, answer, **_):
    """The arithmetic task's reward as a TRL reward function (same as posttrain's exact_match_reward)."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def trl_grpo(cfg: RunConfig, model_path: Path, out_dir, steps: int, clock: StepClock, seed: int = 0):
    """A TRL GRPOTrainer with cfg.rl's settings on the model saved at `model_path`."""
    from trl import GRPOConfig, GRPOTrainer

    c = cfg.rl
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=c.prompts_per_step * c.group_size,
        num_generations=c.group_size, max_completion_length=c.max_new_tokens, learning_rate=c.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=c.grad_clip, beta=c.kl_coef, epsilon=c.clip_eps_low, loss_type="dapo", scale_rewards="group",
        temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, num_iterations=1, max_steps=steps, seed=seed,
        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", report_to=[],
        logging_strategy="no", log_level="error", disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32})  # no per-step log dicts printed (issue 16, item 9)
    return GRPOTrainer(model=str(model_path), reward_funcs=exact_match, args=args, train_dataset=grpo_dataset(cfg),
                       processing_class=tokenizer(), callbacks=[clock.callback])


def clone(model):
    return copy.deepcopy(model)
