"""Rejection-sampling fine-tuning (RFT): sample, keep the best, imitate it, repeat.

    for each round:
      generate   `samples` completions for each of `prompts_per_round` training problems (seeded)
      score      every completion with the scorer (the task's verifiable reward, or a reward model)
      filter     per problem, the best-scored completion that ended with EOS, kept when its score is at
                 least `min_score` (None: always)
      update     `steps` SFT steps (the completion-only next-token loss of recipes/sft.py) on the kept
                 (prompt, completion) pairs, with a fresh AdamW and schedule
      eval       held-out greedy accuracy

This is best-of-n distilled into the weights: expert iteration / RAFT (Dong et al. 2023, "RAFT: Reward
rAnked FineTuning"), the rejection-sampling stage of Llama 2 (Touvron et al. 2023, sec. 3.2.3), and with
a 0/1 verifier ReST-EM (Singh et al. 2023). Departures: each round continues from the current policy
(ReST-EM restarts from the base model each iteration), and one completion per problem is kept.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from posttrain.config import RunConfig
from posttrain.data.sampling import ShuffledBatches, as_random_state
from posttrain.errors import ConfigError
from posttrain.models.adapters import load_trainable_state_dict, trainable_state_dict
from posttrain.recipes.best_of_n import (
    Scorer,
    build_scorer,
    sample_completions,
    score_samples,
)
from posttrain.train.checkpoint import global_rng_state, set_global_rng_state
from posttrain.train.control import NoControl, RunControl
from posttrain.train.losses import sft_loss
from posttrain.train.optim import PhaseTimer, guarded_step, make_optimizer
from posttrain.train.run import initial_accuracy, progress_bar, start_run, write_outputs
from posttrain.train.tracking import held_out


@dataclass
class RFTState:
    policy: torch.nn.Module
    tokenizer: object
    task: object
    scorer: Scorer
    rng: random.Random  # problem order
    sampler: torch.Generator  # token sampling


def setup_rft(cfg: RunConfig, policy, tokenizer, task) -> RFTState:
    c = cfg.rft
    if c.prompts_per_round > len(task.train_problems):
        raise ConfigError(f"rft.prompts_per_round ({c.prompts_per_round}) exceeds the {len(task.train_problems)} "
                          f"training problems of the task")
    return RFTState(policy, tokenizer, task, build_scorer(c.scorer, task), random.Random(f"rft-{cfg.seed}"),
                    torch.Generator().manual_seed(cfg.seed))


def select_best(problems: list, completions: list[list[str]], finished: list[list[bool]],
                scores: list[list[float]], min_score: float | None) -> list[tuple[str, str]]:
    """(prompt, completion) for each problem whose best finished completion (first argmax) passes `min_score`."""
    kept = []
    for p, comps, done, s in zip(problems, completions, finished, scores, strict=True):
        eligible = [j for j in range(len(comps)) if done[j]]
        if not eligible:
            continue
        j = max(eligible, key=lambda i: (s[i], -i))
        if min_score is None or s[j] >= min_score:
            kept.append((p.prompt, comps[j]))
    return kept


def rft_snapshot(state: RFTState, run: dict, round_: int, round_done: bool, inside: dict | None = None
                 ) -> tuple[dict, dict]:
    """({"policy": weights}, state): the rounds so far (`run`), the RNGs and, inside a round (`inside`), its kept
    data, sampling metrics, fine-tuning step, optimizer, schedule and data position."""
    snap = {"round": round_, "round_done": round_done, "step": run["step"], "accuracies": list(run["accuracies"]),
            "kept": list(run["kept"]), "rng": state.rng.getstate(), "sampler": state.sampler.get_state(),
            "global_rng": global_rng_state(), **(inside or {})}
    return {"policy": trainable_state_dict(state.policy)}, snap


def fine_tune(cfg: RunConfig, state: RFTState, data: list[tuple[str, str]], logger, round_: int, run: dict,
              sampled: dict, timer: PhaseTimer, progress=None, ctl: RunControl | None = None,
              resumed: dict | None = None) -> None:
    """`cfg.rft.steps` SFT steps on `data` with a fresh optimizer (or, `resumed`, the saved one from the saved
    step on); advances run["step"]. A step with a non-finite loss or gradient is skipped (logged)."""
    c, model, ctl = cfg.rft, state.policy, ctl or NoControl()
    model.train()
    opt, sched = make_optimizer(model, c.lr, c.weight_decay, c.warmup_steps, c.steps, c.lr_min_ratio)
    batches = ShuffledBatches(data, state.rng, c.batch_size)
    first = 1
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        batches.load_state_dict(resumed["batches"])
        first = resumed["inner"] + 1
    for i in range(first, c.steps + 1):
        with timer("update"):
            prompts, completions = zip(*next(batches))
            loss, _ = sft_loss(model, state.tokenizer, list(prompts), list(completions))
            grad_norm, finite = guarded_step(model, opt, loss, c.grad_clip)
            sched.step()
        run["step"] += 1
        if i % c.log_every == 0 or i == c.steps or not finite:
            logger.log({"step": run["step"], "phase": "rft", "round": round_, "loss": loss.item(),
                        "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                        **({} if finite else {"skipped": 1}), **timer.pop()})
        inside = lambda i=i: {"data": data, "sampled": sampled, "inner": i, "optimizer": opt.state_dict(),  # noqa: E731
                              "scheduler": sched.state_dict(), "batches": batches.state_dict()}
        snapshot = lambda: rft_snapshot(state, run, round_, False, inside())  # noqa: E731
        ctl.end_step("rft", run["step"], finite, snapshot, progress, round=str(round_), loss=f"{loss.item():.3f}")


def train_rft(cfg: RunConfig, state: RFTState, logger, progress=None, ctl: RunControl | None = None) -> dict:
    """Run `cfg.rft.rounds` rounds (from a checkpoint when `ctl` resumes: after a finished round, or inside a
    round's fine-tuning with its kept data); return the held-out accuracy and the kept count of each round.
    A checkpoint is saved at the end of every round and on the `checkpoint.every` cadence of SFT steps."""
    c, task, timer, ctl = cfg.rft, state.task, PhaseTimer(), ctl or NoControl()
    run: dict = {"step": 0, "accuracies": [], "kept": []}  # rounds so far; "step" counts SFT steps
    first_round, inside = 1, None
    if (resumed := ctl.resume_step("rft")) is not None:
        snap = resumed.state
        load_trainable_state_dict(state.policy, resumed.weights["policy"])
        state.rng.setstate(as_random_state(snap["rng"]))
        state.sampler.set_state(snap["sampler"])
        set_global_rng_state(snap["global_rng"])
        run = {"step": snap["step"], "accuracies": list(snap["accuracies"]), "kept": list(snap["kept"])}
        first_round = snap["round"] + 1 if snap["round_done"] else snap["round"]
        inside = None if snap["round_done"] else snap
        if progress is not None:
            progress.update((snap["round"] - 1) * c.steps + (c.steps if snap["round_done"] else snap["inner"]))
    for round_ in range(first_round, c.rounds + 1):
        if inside is None:
            problems = task.sample_prompts(state.rng, c.prompts_per_round)
            with timer("generate"):
                completions, finished = sample_completions(
                    state.policy, state.tokenizer, [p.prompt for p in problems], c.samples,
                    batch_size=c.generate_batch_size, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                    top_k=c.top_k, top_p=c.top_p, generator=state.sampler)
            with timer("score"):
                scores, gold = score_samples(state.scorer, task, problems, completions, finished)
            with timer("filter"):
                data = select_best(problems, completions, finished, scores, c.min_score)
            sampled = {"kept": len(data), "kept_frac": len(data) / len(problems),
                       "sample_accuracy": sum(map(sum, gold)) / (len(problems) * c.samples),
                       "pass_at_n": sum(any(g >= 1.0 for g in row) for row in gold) / len(problems),
                       "score_mean": sum(map(sum, scores)) / (len(problems) * c.samples), **timer.pop()}
        else:  # resumed inside this round's fine-tuning
            data, sampled = [tuple(pair) for pair in inside["data"]], dict(inside["sampled"])
        if data:
            fine_tune(cfg, state, data, logger, round_, run, sampled, timer, progress, ctl, inside)
        elif progress is not None:
            progress.update(c.steps)
        inside = None
        with timer("eval"):
            accuracy = held_out(cfg, state.policy, state.tokenizer, task, logger, "rft", run["step"]).accuracy
        logger.log({"step": run["step"], "phase": "rft", "round": round_, "accuracy": accuracy, **sampled,
                    **timer.pop()})
        run["accuracies"].append(accuracy)
        run["kept"].append(len(data))
        ctl.step_done("rft", run["step"], lambda: rft_snapshot(state, run, round_, True), force=True)  # noqa: B023
        if progress is not None:
            progress.set_postfix(round=round_, kept=len(data), acc=f"{accuracy:.3f}", refresh=False)
    return {"round_accuracies": run["accuracies"], "kept": run["kept"]}


def run_rft(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Rejection-sampling fine-tuning from `model.path` (typically the SFT model) for `rft.rounds` rounds
    (resume: from the newest valid checkpoint, saved at every round's end and on the SFT-step cadence)."""
    from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg)
    if cfg.model.path is None:
        print("note: model.path is not set, so RFT starts from a randomly initialised tiny model")
    c = cfg.rft
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        state = setup_rft(cfg, model, tokenizer, task)
        initial = initial_accuracy(cfg, ctl, logger, model, tokenizer, task, "rft", round=0)
        with progress_bar(c.rounds * c.steps, "RFT", cfg.progress) as bar:
            result = train_rft(cfg, state, logger, bar, ctl)
    summary = write_outputs(cfg, out, model, tokenizer, {"initial_accuracy": initial, "rft_accuracy":
                                                   result["round_accuracies"][-1], **result,
                                                   "eval_problems": len(task.eval_problems)}, start, task, method="rft")
    finish_run(out)
    rounds = " -> ".join(f"{a:.3f}" for a in [initial, *result["round_accuracies"]])
    print(f"RFT held-out accuracy by round {rounds} on {len(task.eval_problems)} problems (kept "
          f"{', '.join(map(str, result['kept']))}); model in {out / 'final'}")
    return summary
