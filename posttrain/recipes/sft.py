"""Supervised fine-tuning: completion-only next-token loss on demonstrations.

    setup -> for each step: batch, forward, loss (prompt tokens masked out), update, log, evaluate

The loss is -log pi(y_t | x, y_<t) over completion tokens only (EOS included), reduced by the shared
`aggregate` in token-mean mode.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from posttrain.config import RunConfig
from posttrain.data.sampling import ShuffledBatches
from posttrain.train.checkpoint import restore_training, training_snapshot
from posttrain.train.control import NoControl, RunControl
from posttrain.train.losses import sft_loss
from posttrain.train.optim import PhaseTimer, guarded_step, make_optimizer
from posttrain.train.run import progress_bar, start_run, write_outputs
from posttrain.train.tracking import held_out


@dataclass
class SFTState:
    model: torch.nn.Module
    tokenizer: object
    task: object
    data: list  # (prompt, completion) demonstrations, fixed for the run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random
    batches: ShuffledBatches  # endless shuffled passes over `data`, drawn from `rng`


def setup_sft(cfg: RunConfig, model, tokenizer, task) -> SFTState:
    """The demonstration set (one per training problem, mistakes drawn once) and the optimizer."""
    rng = random.Random(f"sft-{cfg.seed}")
    data = [(p.prompt, task.demonstration(p, rng)) for p in task.train_problems]
    opt, sched = make_optimizer(model, cfg.sft.lr, cfg.sft.weight_decay, cfg.sft.warmup_steps, cfg.sft.steps,
                                cfg.sft.lr_min_ratio)
    return SFTState(model, tokenizer, task, data, opt, sched, rng, ShuffledBatches(data, rng, cfg.sft.batch_size))


def sft_snapshot(state: SFTState, accuracy: float) -> tuple[dict, dict]:
    """({"policy": weights}, optimizer/scheduler/data-position/RNG state) to continue exactly."""
    return training_snapshot("policy", state.model, state.optimizer, state.scheduler, state.batches, accuracy=accuracy)


def sft_restore(state: SFTState, weights: dict, snap: dict) -> float:
    return restore_training("policy", state.model, state.optimizer, state.scheduler, state.batches, weights,
                            snap)["accuracy"]


def train_sft(cfg: RunConfig, state: SFTState, logger, progress=None, ctl: RunControl | None = None) -> float:
    """Run `cfg.sft.steps` steps (from a checkpoint's step when `ctl` resumes); return the final held-out
    accuracy. A step with a non-finite loss or gradient is skipped (logged as skipped)."""
    c, model, timer = cfg.sft, state.model, PhaseTimer()
    ctl = ctl or NoControl()
    model.train()
    tokens = 0
    accuracy, first = ctl.restore_phase("sft", lambda w, s: sft_restore(state, w, s), float("nan"), progress)
    for step in range(first, c.steps + 1):
        with timer("update"):
            prompts, completions = zip(*next(state.batches))
            loss, n_tokens = sft_loss(model, state.tokenizer, list(prompts), list(completions))
            tokens += n_tokens
            grad_norm, finite = guarded_step(model, state.optimizer, loss, c.grad_clip)
            state.scheduler.step()
        record = {} if finite else {"step": step, "phase": "sft", "skipped": 1, "loss": loss.item()}
        if step % c.log_every == 0 or step == c.steps:
            times = timer.pop()
            record = {"step": step, "phase": "sft", "loss": loss.item(), "grad_norm": grad_norm.item(),
                      "lr": state.scheduler.get_last_lr()[0],
                      "tokens_per_s": tokens / max(times["time/update"], 1e-9), **record, **times}
            tokens = 0
        if (c.eval_every and step % c.eval_every == 0) or step == c.steps:  # steps == 0: see below
            accuracy = held_out(cfg, model, state.tokenizer, state.task, logger, "sft", step).accuracy
            record = {"step": step, "phase": "sft", **record, "accuracy": accuracy}
        if record:
            logger.log(record)
        snapshot = lambda: sft_snapshot(state, accuracy)  # noqa: E731
        ctl.end_step("sft", step, finite, snapshot, progress, loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    if c.steps == 0:
        accuracy = held_out(cfg, model, state.tokenizer, state.task, logger, "sft", 0).accuracy
        logger.log({"step": 0, "phase": "sft", "accuracy": accuracy})
    return accuracy


def run_sft(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Supervised fine-tuning on the task's demonstrations (resume: from the newest valid checkpoint)."""
    from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg)
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        state = setup_sft(cfg, model, tokenizer, task)
        with progress_bar(cfg.sft.steps, "SFT", cfg.progress) as bar:
            accuracy = train_sft(cfg, state, logger, bar, ctl)
    summary = write_outputs(cfg, out, model, tokenizer,
                      {"sft_accuracy": accuracy, "eval_problems": len(task.eval_problems)}, start, task, method="sft")
    finish_run(out)  # after final/ is written: a crash before this point resumes at the last step
    print(f"SFT held-out accuracy {accuracy:.3f} on {len(task.eval_problems)} problems; model in {out / 'final'}")
    return summary
