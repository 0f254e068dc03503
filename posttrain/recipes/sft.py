"""Supervised fine-tuning: completion-only next-token loss on demonstrations.

    setup -> for each step: batch, forward, loss (prompt tokens masked out), update, log, evaluate

The loss is -log pi(y_t | x, y_<t) over completion tokens only (EOS included), reduced by the shared
`aggregate` in token-mean mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from posttrain.algos import aggregate
from posttrain.batch import right_pad
from posttrain.config import RunConfig
from posttrain.checkpoint import global_rng_state, set_global_rng_state
from posttrain.data.sampling import ShuffledBatches, shuffled_batches
from posttrain.models.chat import end_of_turn_id
from posttrain.models.logprobs import response_logprobs
from posttrain.recipes.common import PhaseTimer, encode_prompts, guarded_step, evaluate, make_optimizer
from posttrain.recipes.control import NoControl, RunControl


def sft_loss(model, tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, int]:
    """Token-mean negative log-likelihood of `completions` (+ EOS) given `prompts`; and the token count."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    targets = [ids + [end_of_turn_id(tokenizer)]  # EOS, or a chat template's end-of-turn token
               for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    response_ids, response_mask = right_pad(targets, tokenizer.pad_token_id)
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return aggregate(-logprobs, response_mask, "token-mean"), int(response_mask.sum())


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
    return SFTState(model, tokenizer, task, data, opt, sched, rng, shuffled_batches(data, rng, cfg.sft.batch_size))


def sft_snapshot(state: SFTState, accuracy: float) -> tuple[dict, dict]:
    """({"policy": weights}, optimizer/scheduler/data-position/RNG state) to continue exactly."""
    return {"policy": state.model.state_dict()}, {
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "batches": state.batches.state_dict(), "global_rng": global_rng_state(), "accuracy": accuracy}


def sft_restore(state: SFTState, weights: dict, snap: dict) -> float:
    state.model.load_state_dict(weights["policy"])
    state.optimizer.load_state_dict(snap["optimizer"])
    state.scheduler.load_state_dict(snap["scheduler"])
    state.batches.load_state_dict(snap["batches"])
    set_global_rng_state(snap["global_rng"])
    return snap["accuracy"]


def train_sft(cfg: RunConfig, state: SFTState, logger, progress=None, ctl: RunControl | None = None) -> float:
    """Run `cfg.sft.steps` steps (from a checkpoint's step when `ctl` resumes); return the final held-out
    accuracy. A step with a non-finite loss or gradient is skipped (logged as skipped)."""
    c, model, timer = cfg.sft, state.model, PhaseTimer()
    ctl = ctl or NoControl()
    model.train()
    accuracy, tokens, first = float("nan"), 0, 1
    if (resumed := ctl.resume_step("sft")) is not None:
        accuracy, first = sft_restore(state, resumed.weights, resumed.state), resumed.step + 1
        if progress is not None:
            progress.update(resumed.step)
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
            accuracy = evaluate(model, state.tokenizer, state.task, state.task.eval_problems,
                                cfg.eval.batch_size, cfg.eval.max_new_tokens)
            record = {"step": step, "phase": "sft", **record, "accuracy": accuracy}
        if record:
            logger.log(record)
        snapshot = lambda: sft_snapshot(state, accuracy)  # noqa: E731
        ctl.record_step(finite, "sft", step, snapshot)
        ctl.step_done("sft", step, snapshot)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", refresh=False)
    if c.steps == 0:
        accuracy = evaluate(model, state.tokenizer, state.task, state.task.eval_problems,
                            cfg.eval.batch_size, cfg.eval.max_new_tokens)
        logger.log({"step": 0, "phase": "sft", "accuracy": accuracy})
    return accuracy
