"""Reward-model training: Bradley-Terry on preference pairs, then calibration.

    setup -> for each step: a batch of pairs, score chosen and rejected in one forward pass,
             loss = mean_i -log sigmoid(r_chosen_i - r_rejected_i - margin), update, log, held-out eval
          -> calibrate: mean and std of raw scores on training pairs (both sides), stored with the model

Synthetic pairs (`rm.data: synthetic`) stand in for human labels: for each problem, candidate
completions are the policy's own samples plus plausible wrong answers (`wrong_answers`) and the answer
with a full stop, labelled by the task's hidden gold rule (its verifiable reward: the correct result,
written as the bare number, is preferred to anything else); one pair per problem joins a gold-preferred
completion with a dispreferred one: one of the policy's own mistakes when it made any (comparisons among
the model's samples, as InstructGPT's labellers saw them), else a constructed wrong answer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from posttrain.algos.preference import bradley_terry
from posttrain.config import RunConfig
from posttrain.data import PreferencePair, load_preference_pairs, split_pairs
from posttrain.data.sampling import ShuffledBatches
from posttrain.errors import ConfigError
from posttrain.models.chat import (
    chat_pairs,
)
from posttrain.models.reward import RewardModel, with_adapter
from posttrain.tasks.preference import synthetic_pairs
from posttrain.train.checkpoint import restore_training, training_snapshot
from posttrain.train.control import NoControl, RunControl
from posttrain.train.optim import PhaseTimer, guarded_step, make_optimizer
from posttrain.train.run import (
    dropped_prompts,
    pin_starting_model,
    progress_bar,
    start_run,
    write_json,
    write_model_card,
)


def load_pairs(cfg: RunConfig, task=None, policy=None, tokenizer=None) -> tuple[list, list]:
    """(train, eval) pairs as configured in `cfg.rm`."""
    c = cfg.rm
    if c.data == "synthetic":
        rng = random.Random(f"rm-problems-{cfg.seed}")
        train_problems = [rng.choice(task.train_problems) for _ in range(c.num_pairs)]
        train = synthetic_pairs(task, policy, tokenizer, train_problems, cfg.seed)
        return train, synthetic_pairs(task, policy, tokenizer, task.eval_problems, cfg.seed + 1)
    return preference_splits(c, cfg, tokenizer)


def preference_splits(c, cfg: RunConfig, tokenizer) -> tuple[list, list]:
    """(train, held-out) pairs of a pairs file (`c`: the rm or dpo section: data, split, format, limit,
    eval_data or eval_fraction), rendered with a chat model's template."""
    pairs = load_preference_pairs(c.data, split=c.split, format=c.format, limit=c.limit)
    if c.eval_data is not None:
        train, held_out = pairs, load_preference_pairs(c.eval_data, format=c.format)
    else:
        train, held_out = split_pairs(pairs, c.eval_fraction, cfg.seed)
    return chat_pairs(train, tokenizer, cfg.task), chat_pairs(held_out, tokenizer, cfg.task)


@dataclass
class RMState:
    rm: RewardModel
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random
    batches: ShuffledBatches  # endless shuffled passes over the training pairs, drawn from `rng`


def setup_rm(cfg: RunConfig, rm: RewardModel, train_pairs, eval_pairs) -> RMState:
    opt, sched = make_optimizer(rm.model, cfg.rm.lr, cfg.rm.weight_decay, cfg.rm.warmup_steps, cfg.rm.steps,
                                cfg.rm.lr_min_ratio)
    rng = random.Random(f"rm-{cfg.seed}")
    return RMState(rm, train_pairs, eval_pairs, opt, sched, rng, ShuffledBatches(train_pairs, rng, cfg.rm.batch_size))


def rm_snapshot(state: RMState, result: dict) -> tuple[dict, dict]:
    """({"reward_model": weights}, optimizer/scheduler/data-position/RNG state and the last eval) to continue."""
    return training_snapshot("reward_model", state.rm.model, state.optimizer, state.scheduler, state.batches,
                             result=dict(result))


def rm_restore(state: RMState, weights: dict, snap: dict) -> dict:
    return dict(restore_training("reward_model", state.rm.model, state.optimizer, state.scheduler, state.batches,
                                 weights, snap)["result"])


def pair_rewards(rm: RewardModel, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores (B,), (B,) of the chosen and rejected completions, in one forward pass (with grad)."""
    prompts = [p.prompt for p in pairs]
    ids, mask = rm.encode(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    scores = rm.scores(ids, mask)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_rm(rm: RewardModel, pairs: list[PreferencePair], batch_size: int = 256) -> dict[str, float]:
    """Held-out pairwise accuracy (r_chosen > r_rejected), mean margin r_chosen - r_rejected, and BT loss."""
    was_training = rm.model.training
    rm.model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_rewards(rm, pairs[i:i + batch_size])
        chosen.append(c)
        rejected.append(r)
    rm.model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    loss, _ = bradley_terry(c, r)
    return {"eval_accuracy": (c > r).float().mean().item(), "eval_margin": (c - r).mean().item(),
            "eval_loss": loss.mean().item()}


@torch.no_grad()
def calibrate(rm: RewardModel, pairs: list[PreferencePair], n: int, batch_size: int = 256) -> tuple[float, float]:
    """Store mean and std of the raw scores of both sides of the first `n` pairs; return them."""
    was_training = rm.model.training
    rm.model.eval()
    sample = pairs[:n]
    prompts = [p.prompt for p in sample] * 2
    scores = rm.raw_scores(prompts, [p.chosen for p in sample] + [p.rejected for p in sample], batch_size=batch_size)
    rm.model.train(was_training)
    mean, std = scores.mean().item(), scores.std().item() if len(scores) > 1 else 1.0
    rm.set_normalization(mean, std)
    return mean, std


def train_rm(cfg: RunConfig, state: RMState, logger, progress=None, ctl: RunControl | None = None) -> dict[str, float]:
    """Run `cfg.rm.steps` steps (from a checkpoint's step when `ctl` resumes), calibrate; return the final
    held-out metrics and the normalisation. A step with a non-finite loss or gradient is skipped (logged)."""
    c, model, timer = cfg.rm, state.rm.model, PhaseTimer()
    ctl = ctl or NoControl()
    model.train()
    result, first = ctl.restore_phase("rm", lambda w, s: rm_restore(state, w, s), {}, progress)
    for step in range(first, c.steps + 1):
        with timer("update"):
            chosen, rejected = pair_rewards(state.rm, next(state.batches))
            loss, metrics = bradley_terry(chosen, rejected, margin=c.margin or None)
            loss = loss.mean()
            grad_norm, finite = guarded_step(model, state.optimizer, loss, c.grad_clip)
            state.scheduler.step()
        record = {} if finite else {"step": step, "phase": "rm", "skipped": 1, "loss": loss.item()}
        if step % c.log_every == 0 or step == c.steps:
            record = {"step": step, "phase": "rm", "loss": loss.item(), "accuracy_train": float(metrics["accuracy"]),
                      "margin": float(metrics["margin"]), "grad_norm": grad_norm.item(),
                      "lr": state.scheduler.get_last_lr()[0], **record, **timer.pop()}
        if (c.eval_every and step % c.eval_every == 0) or step == c.steps:
            result = evaluate_rm(state.rm, state.eval_pairs, c.batch_size)
            record = {"step": step, "phase": "rm", **record, **result}
        if record:
            logger.log(record)
        snapshot = lambda: rm_snapshot(state, result)  # noqa: E731
        ctl.end_step("rm", step, finite, snapshot, progress, loss=f"{loss.item():.3f}",
                     acc=f"{result.get('eval_accuracy', float('nan')):.3f}")
    if c.steps == 0:
        result = evaluate_rm(state.rm, state.eval_pairs, c.batch_size)
        logger.log({"step": 0, "phase": "rm", **result})
    mean, std = calibrate(state.rm, state.train_pairs, c.calibration_size, c.batch_size)
    return {**result, "reward_mean": mean, "reward_std": std}


def run_rm(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Reward model (Bradley-Terry) from `model.path` (typically the SFT model) on `rm.data` pairs (resume:
    from the newest valid checkpoint; the starting model, which also samples synthetic pairs, must be unchanged)."""
    if cfg.model.peft == "prompt_tuning":
        raise ConfigError("model.peft=prompt_tuning is not available with `posttrain rm` (a soft prompt conditions "
                          "a causal LM's generation; a reward model trains its head): use model.peft=lora or null")
    from posttrain.models.value import build_scalar_model
    from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, policy, tokenizer = start_run(cfg)
    train_pairs, eval_pairs = load_pairs(cfg, task, policy, tokenizer)
    print(f"reward model: {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    rm = RewardModel(with_adapter(build_scalar_model(cfg.model, tokenizer, cfg.seed), cfg.model, cfg.seed), tokenizer,
                     cfg.rm.max_length)  # model.peft=lora: adapters on the backbone, the head trained fully
    del policy
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        pin_starting_model(cfg, ctl, "start_sha256")
        state = setup_rm(cfg, rm, train_pairs, eval_pairs)
        with progress_bar(cfg.rm.steps, "RM", cfg.progress) as bar:
            result = train_rm(cfg, state, logger, bar, ctl)
    rm.save(out / "final")
    from posttrain.train.report import plot_report

    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**result, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), **dropped_prompts(task),
               "seed": cfg.seed,
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_model_card(cfg, out, "rm", summary, task)
    write_json(out / "summary.json", summary)
    finish_run(out)
    print(f"reward model held-out accuracy {result['eval_accuracy']:.3f}, mean margin {result['eval_margin']:.3f} "
          f"on {len(eval_pairs)} pairs; model in {out / 'final'}")
    return summary
