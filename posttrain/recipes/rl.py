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
from dataclasses import dataclass

import torch

from posttrain.algos import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, VALUE_LOSSES, AdaptiveKLController,
                             FixedKLController, aggregate, masked_mean, masked_whiten)
from posttrain.algos.shaping import informative_groups, overlong_penalty, truncation_loss_mask
from posttrain.batch import RolloutBatch, cat_rollouts
from posttrain.checkpoint import global_rng_state, set_global_rng_state
from posttrain.buffer import Experience, ExperienceBuffer
from posttrain.config import RunConfig
from posttrain.data.text import PtxSampler, load_ptx_texts
from posttrain.errors import InvariantError, ModelLoadError
from posttrain.invariants import check_finite, check_mask_not_empty, check_ratio_is_one
from posttrain.models.logprobs import response_logprobs
from posttrain.models.reward import RewardModel
from posttrain.models.value import critic_from_policy, response_values, scalar_model_from_pretrained
from posttrain.recipes.common import PhaseTimer, decode_responses, encode_prompts, evaluate, make_optimizer
from posttrain.recipes.control import NoControl, RunControl
from posttrain.recipes.sft import sft_loss
from posttrain.rollout import generate


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
                   torch.Generator().manual_seed(cfg.seed))


def outcome_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) outcome rewards -> (B, T) token rewards: the score sits on each response's last token (an empty
    response has no token to carry it)."""
    token_rewards = torch.zeros_like(response_mask)
    last = (response_mask.sum(-1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(len(rewards)), last] = rewards.to(token_rewards.dtype)
    return token_rewards * (response_mask != 0)


def kl_penalty_rewards(scores, logprobs, ref_logprobs, response_mask, beta: float, estimator: str = "k1"):
    """InstructGPT's token rewards: r_t = -beta * KL_t on every response token, + score on the last one.

    scores (B,); logprobs, ref_logprobs, response_mask (B, T) -> (B, T), zero off the mask.
    """
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs) * response_mask
    return outcome_token_rewards(scores, response_mask) - beta * kl


def rollout(cfg: RunConfig, state: RLState, problems, greedy: bool = False) -> RolloutBatch:
    """Samples for `problems` in order (the caller repeats each G times to make contiguous groups), or
    their greedy decodings."""
    ids, mask = encode_prompts(state.tokenizer, [p.prompt for p in problems])
    return generate(state.policy, ids, mask, max_new_tokens=cfg.rl.max_new_tokens,
                    eos_token_id=state.tokenizer.eos_token_id, pad_token_id=state.tokenizer.pad_token_id,
                    temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p, greedy=greedy,
                    generator=None if greedy else state.sampler)


@dataclass
class Scored:
    """Responses and their outcome scores. B = sequences."""

    batch: RolloutBatch
    problems: list  # (B) the problem each row answers
    gold: torch.Tensor  # (B,) the task's verifiable reward
    raw: torch.Tensor  # (B,) the reward model's normalised score, or the gold when rl.reward == "task"
    scores: torch.Tensor  # (B,) raw - missing-EOS penalty + overlong penalty: what the advantages see

    def select(self, rows: list[int]) -> "Scored":
        idx = torch.tensor(rows, dtype=torch.long)
        return Scored(self.batch.select(idx), [self.problems[i] for i in rows], self.gold[idx], self.raw[idx],
                      self.scores[idx])


def score(cfg: RunConfig, state: RLState, problems, batch: RolloutBatch) -> Scored:
    """The outcome score of every response (shaped as configured) and the gold score."""
    c = cfg.rl
    prompts = [p.prompt for p in problems]
    completions = decode_responses(state.tokenizer, batch.response_ids, batch.response_mask)
    gold = torch.tensor(state.task.reward(prompts, completions, problems), dtype=torch.float32)
    raw = gold if state.reward_model is None else state.reward_model.score(prompts, completions,
                                                                            batch.finished.tolist())
    scores = raw - c.missing_eos_penalty * (~batch.finished).float()
    if c.overlong_buffer_frac > 0:
        buffer = round(c.overlong_buffer_frac * c.max_new_tokens)
        scores = scores + overlong_penalty(batch.response_lengths, c.max_new_tokens, buffer,
                                           c.overlong_penalty_factor)
    return Scored(batch, problems, gold, raw, scores)


def sample_groups(cfg: RunConfig, state: RLState, timer: PhaseTimer) -> Scored:
    """G samples for each of prompts_per_step new problems, grouped contiguously, scored."""
    with timer("generate"):
        problems = state.task.sample_prompts(state.rng, cfg.rl.prompts_per_step)
        expanded = [p for p in problems for _ in range(cfg.rl.group_size)]
        batch = rollout(cfg, state, expanded)
    with timer("score"):
        return score(cfg, state, expanded, batch)


def dynamic_sampling(cfg: RunConfig, state: RLState, timer: PhaseTimer) -> tuple[Scored, Scored, dict]:
    """DAPO's dynamic sampling: generate rounds of prompts_per_step groups, keep the groups whose scores are
    not all equal, until prompts_per_step are kept or dynamic_sampling_max_rounds rounds are spent; a batch
    still short is filled with dropped groups. Returns (training batch, everything generated, metrics)."""
    c = cfg.rl
    G, N = c.group_size, c.prompts_per_step
    rounds: list[Scored] = []
    kept: list[int] = []  # first row of each group, in the concatenation of all rounds
    dropped: list[int] = []
    while len(kept) < N and len(rounds) < c.dynamic_sampling_max_rounds:
        r = sample_groups(cfg, state, timer)
        offset = sum(len(x.batch) for x in rounds)
        for g, informative in enumerate(informative_groups(r.scores, G).tolist()):
            (kept if informative else dropped).append(offset + g * G)
        rounds.append(r)
    allgen = Scored(cat_rollouts([r.batch for r in rounds], state.tokenizer.pad_token_id),
                    [p for r in rounds for p in r.problems], *(torch.cat([getattr(r, f) for r in rounds])
                                                               for f in ("gold", "raw", "scores")))
    starts = kept[:N] + dropped[:max(0, N - len(kept))]
    chosen = allgen.select([s + j for s in starts for j in range(G)])
    metrics = {"ds_rounds": len(rounds), "ds_kept_frac": len(kept) / (len(rounds) * N),
               "ds_filled_groups": max(0, N - len(kept))}
    return chosen, allgen, metrics


def greedy_baseline(cfg: RunConfig, state: RLState, data: Scored) -> torch.Tensor:
    """ReMax's baseline: the score of the greedy response to each group's prompt, repeated over the group. (B,)"""
    G = cfg.rl.group_size
    firsts = data.problems[::G]
    greedy = rollout(cfg, state, firsts, greedy=True)
    return score(cfg, state, firsts, greedy).scores.repeat_interleave(G)


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens (1: the critic predicts the returns exactly)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


def make_experience(cfg: RunConfig, state: RLState, timer: PhaseTimer) -> tuple[Experience, dict]:
    """Generate, score, reference, values, advantages: one rollout batch, computed once."""
    c = cfg.rl
    needs = ADVANTAGES.requires(c.advantage)
    if c.dynamic_sampling:
        data, allgen, metrics = dynamic_sampling(cfg, state, timer)
    else:
        data = allgen = sample_groups(cfg, state, timer)
        metrics = {}
    batch, scores, mask = data.batch, data.scores, data.batch.response_mask
    baseline = None
    if "baseline_rewards" in needs:
        with timer("baseline"):
            baseline = greedy_baseline(cfg, state, data)
    ref_logprobs = values = None
    if state.reference is not None:
        with timer("reference"), torch.no_grad():
            ref_logprobs, _ = response_logprobs(state.reference, batch.prompt_ids, batch.prompt_mask,
                                                batch.response_ids, mask, temperature=c.temperature)
    if state.critic is not None:
        with timer("values"), torch.no_grad():
            values = response_values(state.critic, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask)
    with timer("advantages"):
        if c.kl_placement == "reward" and ref_logprobs is not None:
            token_rewards = kl_penalty_rewards(scores, batch.logprobs, ref_logprobs, mask, state.kl_ctl.value,
                                               c.kl_estimator)
        else:
            token_rewards = outcome_token_rewards(scores, mask)
        group_ids = torch.arange(len(batch) // c.group_size).repeat_interleave(c.group_size)
        advantages, returns = ADVANTAGES.get(c.advantage)(token_rewards, mask, values=values, group_ids=group_ids,
                                                          baseline_rewards=baseline, gamma=c.gamma, lam=c.lam,
                                                          eps=c.adv_eps)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
        train_mask = truncation_loss_mask(mask, batch.finished) if c.mask_truncated else mask
        if c.check_invariants:
            check_mask_not_empty(train_mask)
            check_finite(advantages, train_mask, "advantages")
            check_finite(returns, train_mask, "returns")
    exp = Experience(batch.prompt_ids, batch.prompt_mask, batch.response_ids, train_mask,
                     batch.logprobs * train_mask, advantages * train_mask, returns * train_mask, ref_logprobs, values)
    # What the policy does: over everything generated this step (with dynamic sampling, more than is trained on).
    grouped = allgen.gold.view(-1, c.group_size)
    metrics.update({"reward_mean": allgen.scores.mean().item(),
                    "reward_std": allgen.scores.std().item() if len(allgen.scores) > 1 else 0.0,
                    "solve_all_frac": (grouped.min(-1).values == 1).float().mean().item(),
                    "solve_none_frac": (grouped.max(-1).values == 0).float().mean().item(),
                    "response_length": mask.sum(-1).mean().item(),
                    "truncated_frac": (~batch.finished).float().mean().item(), "n_tokens": int(train_mask.sum())})
    if c.overlong_buffer_frac > 0:
        metrics["overlong_penalty_mean"] = (data.scores - data.raw + c.missing_eos_penalty
                                            * (~batch.finished).float()).mean().item()
    if baseline is not None:
        metrics["baseline_reward_mean"] = baseline.mean().item()
    if state.reward_model is not None:
        metrics.update(gold_score=allgen.gold.mean().item(), rm_score_mean=allgen.raw.mean().item(),
                       rm_score_std=allgen.raw.std().item() if len(allgen.raw) > 1 else 0.0)
    if ref_logprobs is not None:  # KL(pi_old || pi_ref): k1 summed over each response, batch mean
        metrics["kl"] = ((batch.logprobs - ref_logprobs) * mask).sum(-1).mean().item()
    if values is not None:
        metrics["explained_variance"] = explained_variance(values, returns, mask)
        metrics["values_mean"] = masked_mean(values, mask).item()
    return exp, metrics


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


def update(cfg: RunConfig, state: RLState) -> dict[str, float]:
    """ppo_epochs passes over the buffer's shuffled minibatches; metrics averaged over all optimizer steps."""
    c = cfg.rl
    totals: dict[str, float] = {}
    n_steps = skipped = 0
    for opt in (state.optimizer, state.critic_optimizer):
        if opt is not None:  # gradients left over from elsewhere (an SFT loop) must not leak in
            opt.zero_grad(set_to_none=True)
    for epoch in range(c.ppo_epochs):
        for k, mb in enumerate(state.buffer.minibatches(c.mini_batches, state.sampler)):
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


def train_rl(cfg: RunConfig, state: RLState, logger, progress=None, ctl: RunControl | None = None) -> float:
    """Run `cfg.rl.steps` rollout steps (from a checkpoint's step when `ctl` resumes); return the final
    held-out accuracy. `ctl` saves checkpoints and handles signals and non-finite steps."""
    ctl = ctl or NoControl()
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
        if (cfg.rl.eval_every and step % cfg.rl.eval_every == 0) or step == cfg.rl.steps:
            with timer("eval"):
                accuracy = evaluate(state.policy, state.tokenizer, state.task, state.task.eval_problems,
                                    cfg.eval.batch_size, cfg.eval.max_new_tokens)
            record["accuracy"] = accuracy
        logger.log({**record, **timer.pop()})
        snapshot = lambda: rl_snapshot(state, accuracy)  # noqa: E731
        ctl.record_step(metrics["skipped_steps"] == 0, "rl", step, snapshot)
        ctl.step_done("rl", step, snapshot)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{accuracy:.3f}",
                                 kl=f"{metrics.get('kl', 0.0):.3f}", refresh=False)
    if cfg.rl.steps == 0:
        accuracy = evaluate(state.policy, state.tokenizer, state.task, state.task.eval_problems,
                            cfg.eval.batch_size, cfg.eval.max_new_tokens)
        logger.log({"step": 0, "phase": "rl", "accuracy": accuracy})
    return accuracy
