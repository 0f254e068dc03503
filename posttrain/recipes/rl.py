"""Online RL: GRPO and family (critic-free) and PPO-RLHF (actor, critic, reference, reward model), one loop.

Every algorithm is a composition of registered pieces named in the config (rl.advantage, rl.policy_loss,
rl.kl_estimator + rl.kl_placement, rl.loss_agg) plus DAPO's switches; presets (posttrain/presets.py) are
just settings. The loop never tests an algorithm's name: what it computes follows from what the estimator
declares it needs (`ADVANTAGES.requires`: "values" -> a critic, "baseline_rewards" -> a greedy rollout).

    for each step:
      generate    G samples for each of N prompts, with per-token log-probs (pi_old); with dynamic
                  sampling, more rounds until N groups have unequal scores (DAPO)
      score       the outcome score: the task's verifiable reward, or the reward model's normalised score;
                  minus missing_eos_penalty without EOS; plus DAPO's overlong penalty; the task's reward
                  is the gold
      baseline    the score of each prompt's greedy response (estimators that need baseline_rewards: ReMax)
      reference   log pi_ref (skipped, and no reference loaded, when kl_coef == 0)
      values      V_old(s_t) from the critic (estimators that need values: GAE)
      advantages  token rewards = score on the last token (- beta * KL_t on every token when
                  kl_placement == "reward"), then the registered estimator, optionally whitened;
                  truncated responses leave the loss mask with rl.mask_truncated; invariants: the mask is
                  not empty and the advantages are finite
      update      ppo_epochs passes over mini_batches shuffled minibatches of the experience buffer; per
                  minibatch one actor step (policy loss [+ beta * KL if kl_placement == "loss"]
                  [- entropy bonus], reduced by `aggregate` over the minibatch, accumulated over
                  micro-batches, + ptx_coef * next-token loss on a ptx minibatch) and one critic step
                  (value loss); invariant: the ratio is 1 on the first minibatch; then the buffer is flushed
      log/eval    metrics line; held-out greedy accuracy (the gold) every eval_every steps

A "step" is one rollout batch of prompts_per_step * group_size sequences and the
ppo_epochs * mini_batches optimizer steps taken on it; learning-rate schedules count steps.

Departures from the papers, all configurable: old log-probs are those returned by generation (equal to a
fresh forward pass to ~1e-6, checked every step by the ratio invariant), which saves a forward pass per
step; the critic has its own optimizer rather than a shared trunk with a value-loss coefficient (as
OpenRLHF and verl).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.algos import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, VALUE_LOSSES, AdaptiveKLController,
                             FixedKLController, aggregate, masked_mean)
from posttrain.batch import map_micro_batches
from posttrain.buffer import Experience, ExperienceBuffer
from posttrain.checkpoint import global_rng_state, set_global_rng_state
from posttrain.config import RunConfig
from posttrain.data.text import PtxSampler, load_ptx_texts
from posttrain.errors import InvariantError, ModelLoadError
from posttrain.invariants import check_ratio_is_one
from posttrain.models.logprobs import response_logprobs
from posttrain.models.precision import recompute_old_logprobs
from posttrain.models.reward import RewardModel
from posttrain.models.value import critic_from_policy, response_values, scalar_model_from_pretrained
from posttrain.recipes.common import PhaseTimer, evaluate, make_optimizer
from posttrain.recipes.control import NoControl, RunControl
from posttrain.recipes.experience import make_experience
from posttrain.recipes.sft import sft_loss

@dataclass
class RLState:
    policy: torch.nn.Module  # the actor
    reference: torch.nn.Module | None  # frozen copy of the starting policy; None when kl_coef == 0
    critic: torch.nn.Module | None  # scalar-head value model; None unless the estimator needs values
    reward_model: RewardModel | None  # frozen; None when rl.reward == "task"
    tokenizer: object
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    critic_optimizer: torch.optim.Optimizer | None
    critic_scheduler: torch.optim.lr_scheduler.LambdaLR | None
    kl_ctl: FixedKLController | AdaptiveKLController
    ptx: PtxSampler | None
    buffer: ExperienceBuffer
    rng: random.Random  # prompt order
    sampler: torch.Generator  # token sampling and minibatch shuffling
    recompute_old_logprobs: bool = False  # model.dtype bf16: log pi_old from the trainer (trainer_old_logprobs)


def _same_vocab(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def setup_rl(cfg: RunConfig, policy, tokenizer, task) -> RLState:
    c = cfg.rl
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if c.kl_coef > 0 else None
    reward_model = RewardModel.load(c.reward_model_path) if c.reward == "reward_model" else None
    critic = critic_opt = critic_sched = None
    if "values" in ADVANTAGES.requires(c.advantage):
        if c.critic_init == "reward_model" or (c.critic_init == "auto" and c.reward_model_path is not None):
            critic_tok = reward_model.tokenizer if reward_model else RewardModel.load(c.reward_model_path).tokenizer
            if not _same_vocab(critic_tok, tokenizer):
                raise ModelLoadError(f"rl.critic_init=reward_model: the reward model in {c.reward_model_path} "
                                     "does not share the policy's tokenizer; use rl.critic_init=policy")
            critic = scalar_model_from_pretrained(c.reward_model_path, tokenizer.pad_token_id)
        else:
            critic = critic_from_policy(policy)
        critic.eval()  # no dropout: see train_rl
        critic_opt, critic_sched = make_optimizer(critic, c.critic_lr, c.weight_decay, c.warmup_steps, c.steps)
    opt, sched = make_optimizer(policy, c.lr, c.weight_decay, c.warmup_steps, c.steps)
    kl_ctl = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.kl_target is not None
              else FixedKLController(c.kl_coef))
    ptx = None
    if c.ptx_coef > 0:
        rng = random.Random(f"ptx-demos-{cfg.seed}")
        data = ([(p.prompt, task.demonstration(p, rng)) for p in task.train_problems] if c.ptx_data == "task"
                else load_ptx_texts(c.ptx_data))
        ptx = PtxSampler(data, cfg.seed)
    return RLState(policy, reference, critic, reward_model, tokenizer, task, opt, sched, critic_opt, critic_sched,
                   kl_ctl, ptx, ExperienceBuffer(tokenizer.pad_token_id), random.Random(f"rl-{cfg.seed}"),
                   torch.Generator().manual_seed(cfg.seed), recompute_old_logprobs(cfg.model))


def actor_backward(cfg: RunConfig, state: RLState, mb: Experience,
                   ptx_batch: tuple[list[str], list[str]] | None = None, check_ratio: bool = False) -> dict[str, float]:
    """Accumulate the actor's gradient for one minibatch (no optimizer step); returns its metrics.

    loss = aggregate(policy loss [+ beta * KL] [- entropy_coef * entropy]) over the minibatch, summed
    exactly over micro-batches (global token/sequence counts), + ptx_coef * ptx next-token loss.
    check_ratio: the minibatch is the first on a fresh rollout batch, so its ratio must be 1 (checked).
    """
    c = cfg.rl
    policy_loss, kl_fn = POLICY_LOSSES.get(c.policy_loss), KL_ESTIMATORS.get(c.kl_estimator)
    n_tok, n_seq = mb.num_tokens, mb.num_seqs
    stats: dict[str, float] = {}
    for micro in mb.split(c.micro_batch_size):
        m = micro.response_mask
        logprobs, entropy = response_logprobs(state.policy, micro.prompt_ids, micro.prompt_mask, micro.response_ids,
                                              m, temperature=c.temperature, with_entropy=True)
        if check_ratio:
            worst = check_ratio_is_one(logprobs, micro.old_logprobs, m, c.ratio_tolerance)
            stats["first_log_ratio_max"] = max(stats.get("first_log_ratio_max", 0.0), worst)
        loss_tok, metrics = policy_loss(logprobs, micro.old_logprobs, micro.advantages, m,
                                        clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high,
                                        dual_clip_c=c.dual_clip_c)
        if c.kl_placement == "loss" and micro.ref_logprobs is not None:
            loss_tok = loss_tok + state.kl_ctl.value * kl_fn(logprobs, micro.ref_logprobs)
        if c.entropy_coef > 0:
            loss_tok = loss_tok - c.entropy_coef * entropy
        loss = aggregate(loss_tok, m, c.loss_agg, global_num_tokens=n_tok, global_num_seqs=n_seq,
                         norm_constant=float(c.max_new_tokens))
        loss.backward()
        share = float(micro.num_tokens / n_tok.clamp(min=1))  # token-weighted means over the minibatch
        metrics.update(entropy=masked_mean(entropy.detach(), m))
        for key, value in metrics.items():
            stats[key] = stats.get(key, 0.0) + float(value) * share
        stats["loss"] = stats.get("loss", 0.0) + float(loss.detach())
    if ptx_batch is not None and c.ptx_coef > 0:
        ptx, _ = sft_loss(state.policy, state.tokenizer, *ptx_batch)
        (c.ptx_coef * ptx).backward()
        stats["ptx_loss"] = float(ptx.detach())
    return stats


def critic_backward(cfg: RunConfig, state: RLState, mb: Experience) -> dict[str, float]:
    """Accumulate the critic's gradient for one minibatch: token-mean value loss against the returns."""
    c = cfg.rl
    n_tok = mb.num_tokens
    stats: dict[str, float] = {}
    for micro in mb.split(c.micro_batch_size):
        m = micro.response_mask
        values = response_values(state.critic, micro.prompt_ids, micro.prompt_mask, micro.response_ids, m)
        loss_tok, metrics = VALUE_LOSSES.get(c.value_loss)(values, micro.values, micro.returns, m,
                                                           clip_eps=c.value_clip)
        loss = aggregate(loss_tok, m, "token-mean", global_num_tokens=n_tok)
        loss.backward()
        share = float(micro.num_tokens / n_tok.clamp(min=1))
        stats["value_loss"] = stats.get("value_loss", 0.0) + float(loss.detach())
        stats["vf_clip_frac"] = stats.get("vf_clip_frac", 0.0) + float(metrics["vf_clip_frac"]) * share
    return stats


def _step(model, optimizer, grad_clip: float, loss: float) -> tuple[float, bool]:
    """Clip and step; a non-finite loss or gradient norm skips the step (gradients dropped). -> (norm, stepped)"""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok


@torch.no_grad()
def trainer_old_logprobs(cfg: RunConfig, state: RLState, minibatches: list[Experience]) -> list[Experience]:
    """log pi_old by the training forward, in exactly the micro-batches the first epoch's update will run (so every
    row is computed with the same batch-mates and the first minibatch's ratio is 1 to the bit). For reduced
    precision (model.dtype=bfloat16), where the sampler's log-probs differ from the trainer's by rounding, and the
    rounding depends on what else is in the batch (shared-prompt prefill, attention kernel by problem size)."""
    c = cfg.rl
    for mb in minibatches:
        mb.old_logprobs = map_micro_batches(mb, c.micro_batch_size, lambda m: response_logprobs(
            state.policy, m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask,
            temperature=c.temperature)[0]) * mb.response_mask
    state.buffer.replace(minibatches)  # later epochs draw from the same rows, now with these log-probs
    return minibatches


def update(cfg: RunConfig, state: RLState) -> dict[str, float]:
    """ppo_epochs passes over the buffer's shuffled minibatches; metrics averaged over all optimizer steps."""
    c = cfg.rl
    totals: dict[str, float] = {}
    n_steps = skipped = 0
    for opt in (state.optimizer, state.critic_optimizer):
        if opt is not None:  # gradients left over from elsewhere (an SFT loop) must not leak in
            opt.zero_grad(set_to_none=True)
    first_epoch = state.buffer.minibatches(c.mini_batches, state.sampler)
    if state.recompute_old_logprobs:
        first_epoch = trainer_old_logprobs(cfg, state, first_epoch)
    for epoch in range(c.ppo_epochs):
        minibatches = first_epoch if epoch == 0 else state.buffer.minibatches(c.mini_batches, state.sampler)
        for k, mb in enumerate(minibatches):
            ptx_batch = state.ptx.next_batch(c.ptx_batch_size) if state.ptx is not None else None
            stats = actor_backward(cfg, state, mb, ptx_batch, check_ratio=c.check_invariants and epoch == k == 0)
            stats["grad_norm"], ok = _step(state.policy, state.optimizer, c.grad_clip,
                                           stats["loss"] + stats.get("ptx_loss", 0.0))
            skipped += not ok
            if state.critic is not None:
                stats.update(critic_backward(cfg, state, mb))
                stats["critic_grad_norm"], ok = _step(state.critic, state.critic_optimizer, c.grad_clip,
                                                      stats["value_loss"])
                skipped += not ok
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_steps += 1
    state.buffer.clear()
    state.scheduler.step()
    if state.critic_scheduler is not None:
        state.critic_scheduler.step()
    return {**{key: value / max(n_steps, 1) for key, value in totals.items()}, "skipped_steps": skipped}


def rl_step(cfg: RunConfig, state: RLState, timer: PhaseTimer) -> dict:
    """One rollout step: make experience, update, adapt the KL coefficient. Returns its metrics."""
    exp, metrics = make_experience(cfg, state, timer)
    state.buffer.add(exp)
    with timer("update"):
        stats = update(cfg, state)
    kl_coef = state.kl_ctl.value
    if "kl" in metrics:
        state.kl_ctl.update(metrics["kl"], n_steps=len(exp))
    return {**metrics, **stats, "kl_coef": kl_coef, "lr": state.scheduler.get_last_lr()[0]}


def rl_snapshot(state: RLState, accuracy: float) -> tuple[dict, dict]:
    """Everything a resumed run needs to continue exactly: ({model: weights}, state)."""
    weights = {"policy": state.policy.state_dict()}
    snap = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "kl_ctl": state.kl_ctl.state_dict(), "rng": state.rng.getstate(), "sampler": state.sampler.get_state(),
            "global_rng": global_rng_state(), "accuracy": accuracy}
    if state.critic is not None:
        weights["critic"] = state.critic.state_dict()
        snap.update(critic_optimizer=state.critic_optimizer.state_dict(),
                    critic_scheduler=state.critic_scheduler.state_dict())
    if state.ptx is not None:
        snap["ptx"] = state.ptx.state_dict()
    return weights, snap


def rl_restore(state: RLState, weights: dict, snap: dict) -> float:
    """Load an `rl_snapshot` into a freshly set-up state; returns the accuracy it recorded."""
    from posttrain.data.sampling import as_random_state  # noqa: PLC0415

    state.policy.load_state_dict(weights["policy"])
    state.optimizer.load_state_dict(snap["optimizer"])
    state.scheduler.load_state_dict(snap["scheduler"])
    state.kl_ctl.load_state_dict(snap["kl_ctl"])
    state.rng.setstate(as_random_state(snap["rng"]))
    state.sampler.set_state(snap["sampler"])
    set_global_rng_state(snap["global_rng"])
    if state.critic is not None:
        state.critic.load_state_dict(weights["critic"])
        state.critic_optimizer.load_state_dict(snap["critic_optimizer"])
        state.critic_scheduler.load_state_dict(snap["critic_scheduler"])
    if state.ptx is not None:
        state.ptx.load_state_dict(snap["ptx"])
    return snap["accuracy"]


def end_rl_step(cfg: RunConfig, step: int, record: dict, accuracy: float, timer: PhaseTimer, logger, ctl: RunControl,
                progress, evaluate_now: Callable[[], float],
                snapshot: Callable[[float], tuple[dict, dict]]) -> float:
    """The end of an RL step, the same in the local and the Ray loop: held-out accuracy on its cadence (and at
    the last step), the metrics line with the phase timings, the non-finite guard and checkpoint (`snapshot` of
    the state with the current accuracy), the progress bar. Returns the current accuracy."""
    if (cfg.rl.eval_every and step % cfg.rl.eval_every == 0) or step == cfg.rl.steps:
        with timer("eval"):
            accuracy = evaluate_now()
        record["accuracy"] = accuracy
    logger.log({**record, **timer.pop()})
    ctl.record_step(record["skipped_steps"] == 0, "rl", step, lambda: snapshot(accuracy))
    ctl.step_done("rl", step, lambda: snapshot(accuracy))
    if progress is not None:
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{accuracy:.3f}",
                             kl=f"{record.get('kl', 0.0):.3f}", refresh=False)
    return accuracy


def train_rl(cfg: RunConfig, state: RLState, logger, progress=None, ctl: RunControl | None = None,
             evaluator: Callable[[], float] | None = None) -> float:
    """Run `cfg.rl.steps` rollout steps (from a checkpoint's step when `ctl` resumes); return the final
    held-out accuracy. `ctl` saves checkpoints and handles signals and non-finite steps. `evaluator`: the held-out
    evaluation (default: greedy accuracy on the task's eval problems), e.g. one that keeps per-prompt scores."""
    ctl = ctl or NoControl()
    evaluate_now = evaluator or (lambda: evaluate(state.policy, state.tokenizer, state.task, state.task.eval_problems,
                                                  cfg.eval.batch_size, cfg.eval.max_new_tokens))
    timer = PhaseTimer()
    # Eval mode all along: no dropout, so the training forward pass gives generation's log-probs (the ratio
    # invariant), as TRL's disable_dropout does. Nothing else in a causal LM depends on the mode.
    state.policy.eval()
    accuracy, first = float("nan"), 1
    if (resumed := ctl.resume_step("rl")) is not None:
        accuracy, first = rl_restore(state, resumed.weights, resumed.state), resumed.step + 1
        if progress is not None:
            progress.update(resumed.step)
    for step in range(first, cfg.rl.steps + 1):
        start = time.perf_counter()
        try:
            metrics = rl_step(cfg, state, timer)
        except InvariantError as err:
            raise InvariantError(f"RL step {step}: {err}") from None
        n_tokens = metrics.pop("n_tokens")
        record = {"step": step, "phase": "rl", **metrics,
                  "tokens_per_s": n_tokens / (time.perf_counter() - start)}
        accuracy = end_rl_step(cfg, step, record, accuracy, timer, logger, ctl, progress, evaluate_now,
                               lambda acc: rl_snapshot(state, acc))
    if cfg.rl.steps == 0:
        accuracy = evaluate_now()
        logger.log({"step": 0, "phase": "rl", "accuracy": accuracy})
    return accuracy
