"""Online RL with verifiable rewards (GRPO by default): setup, then one loop of named, timed phases.

    for each step:
      generate    G samples for each of N prompts, with per-token log-probs (the old policy)
      score       the task's verifiable reward for every completion
      reference   log pi_ref for the KL term (skipped, and no reference loaded, when kl_coef == 0)
      advantages  the registered estimator (grpo: (r - group mean) / (group std + eps)), over tokens
      update      ppo_epochs x mini_batches optimizer steps on the registered policy loss
                  + kl_coef * KL estimator, reduced by the shared `aggregate`
      log/eval    metrics line; held-out greedy accuracy every eval_every steps

Departures from DeepSeekMath's GRPO, all configurable: token-mean aggregation over the batch (the paper
averages per sequence first), and the old log-probs are the ones returned by generation (they equal a
fresh forward pass to ~1e-6, see tests/test_rollout.py), which saves one forward pass per step.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch

from posttrain.algos import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, aggregate, masked_mean
from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.models.logprobs import response_logprobs
from posttrain.recipes.common import PhaseTimer, decode_responses, encode_prompts, evaluate, make_optimizer
from posttrain.rollout import generate


@dataclass
class RLState:
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # frozen copy of the starting policy; None when kl_coef == 0
    tokenizer: object
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random  # prompt order
    sampler: torch.Generator  # token sampling


def setup_rl(cfg: RunConfig, policy, tokenizer, task) -> RLState:
    reference = None
    if cfg.rl.kl_coef > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    opt, sched = make_optimizer(policy, cfg.rl.lr, cfg.rl.weight_decay, cfg.rl.warmup_steps, cfg.rl.steps)
    sampler = torch.Generator().manual_seed(cfg.seed)
    return RLState(policy, reference, tokenizer, task, opt, sched, random.Random(f"rl-{cfg.seed}"), sampler)


def outcome_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) outcome rewards -> (B, T) token rewards: the score sits on each response's last token."""
    token_rewards = torch.zeros_like(response_mask)
    last = (response_mask.sum(-1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(len(rewards)), last] = rewards
    return token_rewards


def rollout(cfg: RunConfig, state: RLState, problems) -> tuple[RolloutBatch, list]:
    """G samples for each problem, grouped contiguously: rows i*G .. i*G+G-1 share problem i."""
    G = cfg.rl.group_size
    expanded = [p for p in problems for _ in range(G)]
    ids, mask = encode_prompts(state.tokenizer, [p.prompt for p in expanded])
    batch = generate(state.policy, ids, mask, max_new_tokens=cfg.rl.max_new_tokens,
                     eos_token_id=state.tokenizer.eos_token_id, pad_token_id=state.tokenizer.pad_token_id,
                     temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p,
                     generator=state.sampler)
    return batch, expanded


def update(cfg: RunConfig, state: RLState, batch: RolloutBatch, advantages, ref_logprobs) -> dict:
    """ppo_epochs passes of mini_batches optimizer steps; returns the metrics of the last pass, averaged."""
    c = cfg.rl
    policy_loss, kl_fn = POLICY_LOSSES.get(c.policy_loss), KL_ESTIMATORS.get(c.kl_estimator)
    B = len(batch)
    mb = B // c.mini_batches
    stats: dict[str, float] = {}
    for _ in range(c.ppo_epochs):
        perm = torch.randperm(B, generator=state.sampler) if c.mini_batches > 1 else torch.arange(B)
        stats = {}
        for k in range(c.mini_batches):
            idx = perm[k * mb:(k + 1) * mb]
            b = batch.select(idx)
            m_mask = b.response_mask
            logprobs, entropy = response_logprobs(state.policy, b.prompt_ids, b.prompt_mask, b.response_ids,
                                                  m_mask, temperature=c.temperature, with_entropy=True)
            pg_tok, metrics = policy_loss(logprobs, b.logprobs, advantages[idx], m_mask,
                                          clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high)
            loss_tok = pg_tok
            if state.reference is not None:
                kl_tok = kl_fn(logprobs, ref_logprobs[idx])
                loss_tok = loss_tok + c.kl_coef * kl_tok
                metrics["kl"] = masked_mean(kl_tok.detach(), m_mask)
            loss = aggregate(loss_tok, m_mask, c.loss_agg, norm_constant=float(c.max_new_tokens))
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(state.policy.parameters(), c.grad_clip)
            state.optimizer.step()
            metrics.update(loss=loss.detach(), grad_norm=grad_norm, entropy=masked_mean(entropy.detach(), m_mask))
            for key, value in metrics.items():
                stats[key] = stats.get(key, 0.0) + float(value) / c.mini_batches
    state.scheduler.step()
    return stats


def rl_step(cfg: RunConfig, state: RLState, timer: PhaseTimer) -> dict:
    """One rollout step: generate, score, reference, advantages, update. Returns its metrics."""
    with timer("generate"):
        problems = state.task.sample_prompts(state.rng, cfg.rl.prompts_per_step)
        batch, expanded = rollout(cfg, state, problems)
    with timer("score"):
        completions = decode_responses(state.tokenizer, batch.response_ids, batch.response_mask)
        rewards = torch.tensor(state.task.reward([p.prompt for p in expanded], completions, expanded))
    ref_logprobs = None
    if state.reference is not None:
        with timer("reference"), torch.no_grad():
            ref_logprobs, _ = response_logprobs(state.reference, batch.prompt_ids, batch.prompt_mask,
                                                batch.response_ids, batch.response_mask,
                                                temperature=cfg.rl.temperature)
    with timer("advantages"):
        group_ids = torch.arange(len(problems)).repeat_interleave(cfg.rl.group_size)
        advantages, _ = ADVANTAGES.get(cfg.rl.advantage)(
            outcome_token_rewards(rewards, batch.response_mask), batch.response_mask,
            group_ids=group_ids, eps=cfg.rl.adv_eps)
    with timer("update"):
        stats = update(cfg, state, batch, advantages, ref_logprobs)
    grouped = rewards.view(-1, cfg.rl.group_size)
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            "solve_all_frac": (grouped.min(-1).values == 1).float().mean().item(),
            "solve_none_frac": (grouped.max(-1).values == 0).float().mean().item(),
            "response_length": batch.response_mask.sum(-1).mean().item(),
            "truncated_frac": (~batch.finished).float().mean().item(),
            "kl": stats.pop("kl", 0.0), **stats, "lr": state.scheduler.get_last_lr()[0],
            "n_tokens": int(batch.response_mask.sum())}


def train_rl(cfg: RunConfig, state: RLState, logger, progress=None) -> float:
    """Run `cfg.rl.steps` rollout steps; return the final held-out accuracy."""
    timer = PhaseTimer()
    state.policy.train()
    accuracy = float("nan")
    for step in range(1, cfg.rl.steps + 1):
        start = time.perf_counter()
        metrics = rl_step(cfg, state, timer)
        n_tokens = metrics.pop("n_tokens")
        record = {"step": step, "phase": "rl", **metrics,
                  "tokens_per_s": n_tokens / (time.perf_counter() - start)}
        if (cfg.rl.eval_every and step % cfg.rl.eval_every == 0) or step == cfg.rl.steps:
            with timer("eval"):
                accuracy = evaluate(state.policy, state.tokenizer, state.task, state.task.eval_problems,
                                    cfg.eval.batch_size, cfg.eval.max_new_tokens)
            record["accuracy"] = accuracy
        logger.log({**record, **timer.pop()})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{accuracy:.3f}",
                                 kl=f"{metrics['kl']:.4f}", refresh=False)
    if cfg.rl.steps == 0:
        accuracy = evaluate(state.policy, state.tokenizer, state.task, state.task.eval_problems,
                            cfg.eval.batch_size, cfg.eval.max_new_tokens)
        logger.log({"step": 0, "phase": "rl", "accuracy": accuracy})
    return accuracy
