"""Preference optimisation of a policy without a reward model: DPO, IPO, SLiC-HF, SimPO.

    setup -> the pairs; log pi_ref(y|x) of every chosen and rejected completion, computed once with the
             starting policy before any update (skipped when the loss is reference-free), so no second
             model is kept in memory; the optimizer
    for each step:
      policy     log pi_theta of the chosen and rejected completions of a batch, in one forward pass
      update     rewards r = sum_t log pi_theta - log pi_ref [/ |y|] (`implicit_rewards`), the registered
                 loss (`dpo.loss`) [+ sft_coef x token-mean NLL of the chosen completions], AdamW step
      log/eval   metrics line; held-out gold accuracy (greedy) and held-out pair metrics every eval_every steps

Each sequence is the prompt (with BOS, left-padded) followed by the completion and EOS, tokenised as SFT
tokenises demonstrations, so |y| counts the EOS. Which reward a loss compares, and its default beta,
margin and SFT coefficient, come from `PREFERENCE_SPECS`; the config can override each. Departures:
the reference is the policy at the start of this run (usually the SFT model, as in the DPO paper's
"SFT reference"); the SFT regulariser is the token mean (SLiC-HF sums over the sequence).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos import PREFERENCE_LOSSES, PREFERENCE_SPECS, aggregate
from posttrain.algos.preference import implicit_rewards
from posttrain.batch import left_pad, right_pad
from posttrain.config import DPOConfig, RunConfig
from posttrain.data import PreferencePair
from posttrain.data.sampling import ShuffledBatches
from posttrain.errors import ConfigError
from posttrain.models.chat import encode_texts, end_of_turn_id
from posttrain.models.logprobs import response_logprobs
from posttrain.recipes.reward_model import preference_splits
from posttrain.train import tracking
from posttrain.train.checkpoint import restore_training, training_snapshot
from posttrain.train.control import NoControl, RunControl
from posttrain.train.optim import PhaseTimer, guarded_step, make_optimizer
from posttrain.train.run import (
    pin_starting_model,
    progress_bar,
    start_run,
    write_outputs,
)


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss with every setting resolved (config value, else the loss's paper default)."""

    name: str
    beta: float
    margin: float
    use_reference: bool
    length_normalize: bool
    sft_coef: float
    max_length: int | None = None  # longest prompt + completion in tokens (dpo.max_length)


def resolve_loss(c: DPOConfig) -> PreferenceLoss:
    spec = PREFERENCE_SPECS[c.loss]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return PreferenceLoss(c.loss, pick(c.beta, spec.beta), pick(c.margin, spec.margin),
                          not pick(c.reference_free, not spec.use_reference),
                          pick(c.length_normalize, spec.length_normalize), pick(c.sft_coef, spec.sft_coef),
                          c.max_length)


def load_dpo_pairs(cfg: RunConfig, task=None, policy=None, tokenizer=None) -> tuple[list, list]:
    """(train, eval) pairs as configured in `cfg.dpo`."""
    c = cfg.dpo
    if c.data == "synthetic":
        from posttrain.tasks.preference import ArithmeticPreferenceTask

        if task.name != "arithmetic":
            raise ConfigError(f"dpo.data 'synthetic' builds pairs from the arithmetic task, not task {task.name!r}; "
                              f"give a pairs file (dpo.data=pairs.jsonl)")

        return ArithmeticPreferenceTask(task).train_eval_pairs(c.num_pairs, policy, tokenizer, cfg.seed)
    return preference_splits(c, cfg, tokenizer)


def pair_logprobs(model, tokenizer, pairs: list[PreferencePair],
                  max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token log pi(y_t | x, y_<t) of the chosen then the rejected completions (+ EOS) of `pairs`:
    logprobs (2B, T) (rows 0..B-1 chosen, B..2B-1 rejected, 0 off the mask) and response_mask (2B, T).

    max_length: a pair longer than this (prompt + its longer side) keeps the last tokens of its prompt, the same
    ones for both sides, and a side that alone is longer keeps its first max_length - 1 tokens (TRL's
    keep-end for the prompt, keep-start for the completion)."""
    B = len(pairs)
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = encode_texts(tokenizer, [p.prompt for p in pairs])
    eot = end_of_turn_id(tokenizer)  # EOS, or a chat template's end-of-turn token (renders the template: once)
    targets = [ids + [eot] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    if max_length is not None:
        targets = [t[:max_length - 1] for t in targets]
        prompts = [p[-(max_length - max(len(targets[i]), len(targets[B + i]))):] for i, p in enumerate(prompts)]
    prompt_ids, prompt_mask = left_pad(prompts * 2, tokenizer.pad_token_id)
    response_ids, response_mask = right_pad(targets, tokenizer.pad_token_id)
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return logprobs, response_mask


@torch.no_grad()
def sequence_logprobs(model, tokenizer, pairs: list[PreferencePair], batch_size: int = 64,
                      max_length: int | None = None) -> Tensor:
    """(N, 2) summed log pi(y|x) of the chosen (column 0) and rejected (column 1) completion of each pair."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        logprobs, mask = pair_logprobs(model, tokenizer, chunk, max_length)
        sums = (logprobs * mask).sum(-1)  # (2b,)
        out.append(torch.stack([sums[:len(chunk)], sums[len(chunk):]], dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


@dataclass
class DPOState:
    policy: torch.nn.Module
    tokenizer: object
    task: object
    loss: PreferenceLoss
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    ref_train: Tensor | None  # (N_train, 2) log pi_ref(y_w|x), log pi_ref(y_l|x); None when reference-free
    ref_eval: Tensor | None  # (N_eval, 2)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random
    batches: ShuffledBatches  # endless shuffled passes over the training pair indices, drawn from `rng`


def setup_dpo(cfg: RunConfig, policy, tokenizer, task, train_pairs, eval_pairs) -> DPOState:
    """Reference log-probs of every pair (once, with the starting policy) and the optimizer."""
    loss = resolve_loss(cfg.dpo)
    ref_train = ref_eval = None
    if loss.use_reference:
        ref_train = sequence_logprobs(policy, tokenizer, train_pairs, cfg.dpo.batch_size, loss.max_length)
        ref_eval = sequence_logprobs(policy, tokenizer, eval_pairs, cfg.dpo.batch_size, loss.max_length)
    c = cfg.dpo
    opt, sched = make_optimizer(policy, c.lr, c.weight_decay, c.warmup_steps, c.steps, c.lr_min_ratio)
    rng = random.Random(f"dpo-{cfg.seed}")
    return DPOState(policy, tokenizer, task, loss, train_pairs, eval_pairs, ref_train, ref_eval, opt, sched, rng,
                    ShuffledBatches(range(len(train_pairs)), rng, c.batch_size))


def dpo_snapshot(state: DPOState, result: dict) -> tuple[dict, dict]:
    """({"policy": weights}, optimizer/scheduler/data-position/RNG state and the last held-out result)."""
    return training_snapshot("policy", state.policy, state.optimizer, state.scheduler, state.batches,
                             result=dict(result))


def dpo_restore(state: DPOState, weights: dict, snap: dict) -> dict:
    return dict(restore_training("policy", state.policy, state.optimizer, state.scheduler, state.batches, weights,
                                 snap)["result"])


def preference_loss(loss: PreferenceLoss, model, tokenizer, pairs: list[PreferencePair],
                    ref: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The batch's mean registered loss (+ sft_coef x NLL of the chosen) and its metrics; `ref`: (B, 2) or None."""
    B = len(pairs)
    logprobs, mask = pair_logprobs(model, tokenizer, pairs, loss.max_length)  # (2B, T)
    ref_sums = None if ref is None else torch.cat([ref[:, 0], ref[:, 1]])  # (2B,)
    rewards = implicit_rewards(logprobs, mask, ref_sums, length_normalize=loss.length_normalize)  # (2B,)
    per_pair, metrics = PREFERENCE_LOSSES.get(loss.name)(rewards[:B], rewards[B:], beta=loss.beta,
                                                         margin=loss.margin)
    total = per_pair.mean()
    nll = aggregate(-logprobs[:B], mask[:B], "token-mean")
    if loss.sft_coef:
        total = total + loss.sft_coef * nll
    with torch.no_grad():
        sums = (logprobs * mask).sum(-1)
        metrics = {**metrics, "logp_chosen": sums[:B].mean(), "logp_rejected": sums[B:].mean(),
                   "sft_loss": nll.detach()}
    return total, metrics


@torch.no_grad()
def evaluate_pairs(state: DPOState, batch_size: int = 64) -> dict[str, float]:
    """Held-out pair metrics: implicit-reward accuracy, margin, chosen and rejected rewards, loss."""
    if not state.eval_pairs:
        return {}
    model = state.policy
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = len(state.eval_pairs)
    for i in range(0, n, batch_size):
        chunk = state.eval_pairs[i:i + batch_size]
        ref = None if state.ref_eval is None else state.ref_eval[i:i + len(chunk)]
        loss, metrics = preference_loss(state.loss, model, state.tokenizer, chunk, ref)
        for key, value in {"loss": loss, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(chunk)
    model.train(was_training)
    return {f"eval_{k}": v / n for k, v in totals.items() if k in ("loss", "accuracy", "margin", "chosen_reward",
                                                                   "rejected_reward")}


def train_dpo(cfg: RunConfig, state: DPOState, logger, progress=None, ctl: RunControl | None = None) -> dict:
    """Run `cfg.dpo.steps` steps (from a checkpoint's step when `ctl` resumes); return the final held-out
    gold accuracy (`accuracy`, and per problem `gold`) and held-out pair metrics. A step with a non-finite
    loss or gradient is skipped (logged as skipped)."""
    c, model, timer = cfg.dpo, state.policy, PhaseTimer()
    ctl = ctl or NoControl()
    model.train()
    result, first = ctl.restore_phase("dpo", lambda w, s: dpo_restore(state, w, s), {}, progress)

    def held_out(step: int) -> dict:
        with timer("eval"):
            gold = tracking.held_out(cfg, model, state.tokenizer, state.task, logger, "dpo", step).scores
            return {"accuracy": sum(gold) / len(gold), **evaluate_pairs(state, cfg.dpo.batch_size), "gold": gold}

    for step in range(first, c.steps + 1):
        idx = next(state.batches)
        pairs = [state.train_pairs[i] for i in idx]
        ref = None if state.ref_train is None else state.ref_train[idx]
        with timer("policy"):
            loss, metrics = preference_loss(state.loss, model, state.tokenizer, pairs, ref)
        with timer("update"):
            grad_norm, finite = guarded_step(model, state.optimizer, loss, c.grad_clip)
            state.scheduler.step()
        evaluate_now = (c.eval_every and step % c.eval_every == 0) or step == c.steps
        if evaluate_now:
            result = held_out(step)
        if evaluate_now or step % c.log_every == 0 or not finite:
            logger.log({"step": step, "phase": "dpo", "loss": loss.item(), "accuracy_train": metrics["accuracy"],
                        **{k: v for k, v in metrics.items() if k != "accuracy"}, "grad_norm": grad_norm.item(),
                        "lr": state.scheduler.get_last_lr()[0],
                        **({k: v for k, v in result.items() if k != "gold"} if evaluate_now else {}),
                        **({} if finite else {"skipped": 1}), **timer.pop()})
        snapshot = lambda: dpo_snapshot(state, result)  # noqa: E731
        ctl.end_step("dpo", step, finite, snapshot, progress, loss=f"{loss.item():.3f}",
                     acc=f"{result.get('accuracy', float('nan')):.3f}")
    if c.steps == 0:
        result = held_out(0)
        logger.log({"step": 0, "phase": "dpo", **{k: v for k, v in result.items() if k != "gold"}})
    return result


def run_dpo(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """DPO (or IPO, SLiC-HF, SimPO: `dpo.loss`) from `model.path` (typically the SFT model) on `dpo.data` pairs
    (resume: from the newest valid checkpoint; the starting model, which is also the reference, must be unchanged)."""
    from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run

    from posttrain.recipes.pipeline import confidence_interval

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg)
    if cfg.model.path is None:
        print("note: model.path is not set, so DPO starts from a randomly initialised tiny model")
    train_pairs, eval_pairs = load_dpo_pairs(cfg, task, model, tokenizer)
    print(f"{cfg.dpo.loss}: {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        if resumed is None:
            before = tracking.held_out(cfg, model, tokenizer, task, logger, "dpo", 0).scores
            logger.log({"step": 0, "phase": "dpo", "accuracy": sum(before) / len(before)})
        else:
            before = list(resumed.state["initial_gold"])
        initial = sum(before) / len(before)
        ctl.extra["initial_gold"] = before
        pin_starting_model(cfg, ctl)
        state = setup_dpo(cfg, model, tokenizer, task, train_pairs, eval_pairs)  # reference log-probs: before restore
        with progress_bar(cfg.dpo.steps, cfg.dpo.loss.upper(), cfg.progress) as bar:
            result = train_dpo(cfg, state, logger, bar, ctl)
    mean, lo, hi = confidence_interval(before, result["gold"])
    loss = state.loss
    summary = write_outputs(cfg, out, model, tokenizer, {
        "initial_accuracy": initial, "dpo_accuracy": result["accuracy"], "improvement": mean,
        "improvement_ci95": [lo, hi], "eval_problems": len(before), "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs), **{k: v for k, v in result.items() if k.startswith("eval_")},
        "loss": loss.name, "beta": loss.beta, "margin": loss.margin, "reference": loss.use_reference,
        "length_normalize": loss.length_normalize, "sft_coef": loss.sft_coef}, start, task, method="dpo")
    finish_run(out)
    print(f"{loss.name} held-out accuracy {initial:.3f} -> {result['accuracy']:.3f} ({mean:+.3f}, 95% CI "
          f"{lo:+.3f} .. {hi:+.3f}) on {len(before)} problems; held-out pair accuracy "
          f"{result.get('eval_accuracy', float('nan')):.3f}; model in {out / 'final'}")
    return summary
