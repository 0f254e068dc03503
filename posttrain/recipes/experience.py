"""Making one rollout batch of experience for the RL loop (posttrain/recipes/rl.py): generate, score (with
DAPO's shaping and dynamic sampling), ReMax's greedy baseline, reference log-probs, values, token rewards,
advantages and the invariants on them. Everything here runs without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from posttrain.algos import ADVANTAGES, KL_ESTIMATORS, masked_mean, masked_whiten
from posttrain.algos.shaping import informative_groups, overlong_penalty, truncation_loss_mask
from posttrain.batch import RolloutBatch, cat_rollouts, map_micro_batches
from posttrain.buffer import Experience
from posttrain.config import RunConfig
from posttrain.invariants import check_finite, check_mask_not_empty
from posttrain.models.chat import stop_token_ids
from posttrain.models.logprobs import response_logprobs
from posttrain.models.value import response_values
from posttrain.recipes.common import PhaseTimer, decode_responses, encode_prompts
from posttrain.rollout import generate

if TYPE_CHECKING:
    from posttrain.recipes.rl import RLState


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
                    eos_token_id=stop_token_ids(state.tokenizer), pad_token_id=state.tokenizer.pad_token_id,
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
    reward_metrics: dict = field(default_factory=dict)  # data tasks: reward/errors, reward/<fn>, ...

    def select(self, rows: list[int]) -> "Scored":
        idx = torch.tensor(rows, dtype=torch.long)
        return Scored(self.batch.select(idx), [self.problems[i] for i in rows], self.gold[idx], self.raw[idx],
                      self.scores[idx], self.reward_metrics)


def score(cfg: RunConfig, state: RLState, problems, batch: RolloutBatch) -> Scored:
    """The outcome score of every response (shaped as configured) and the gold score."""
    c = cfg.rl
    prompts = [p.prompt for p in problems]
    completions = decode_responses(state.tokenizer, batch.response_ids, batch.response_mask)
    scorer = getattr(state.task, "score", None)  # data tasks: per-function breakdown and error counts
    scored = scorer(prompts, completions, problems) if scorer is not None else None
    gold = torch.tensor(scored.rewards if scored is not None else state.task.reward(prompts, completions, problems),
                        dtype=torch.float32)
    raw = gold if state.reward_model is None else state.reward_model.score(prompts, completions,
                                                                            batch.finished.tolist())
    scores = raw - c.missing_eos_penalty * (~batch.finished).float()
    if c.overlong_buffer_frac > 0:
        buffer = round(c.overlong_buffer_frac * c.max_new_tokens)
        scores = scores + overlong_penalty(batch.response_lengths, c.max_new_tokens, buffer,
                                           c.overlong_penalty_factor)
    return Scored(batch, problems, gold, raw, scores, scored.metrics if scored is not None else {})


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
    return informative_rounds(cfg, lambda _round: sample_groups(cfg, state, timer), state.tokenizer.pad_token_id)


def informative_rounds(cfg: RunConfig, sample_round: Callable[[int], Scored], pad_token_id: int
                       ) -> tuple[Scored, Scored, dict]:
    """`dynamic_sampling` given how to sample round k (in one process, or sharded over Ray workers)."""
    c = cfg.rl
    G, N = c.group_size, c.prompts_per_step
    rounds: list[Scored] = []
    kept: list[int] = []  # first row of each group, in the concatenation of all rounds
    dropped: list[int] = []
    while len(kept) < N and len(rounds) < c.dynamic_sampling_max_rounds:
        r = sample_round(len(rounds))
        offset = sum(len(x.batch) for x in rounds)
        for g, informative in enumerate(informative_groups(r.scores, G).tolist()):
            (kept if informative else dropped).append(offset + g * G)
        rounds.append(r)
    allgen = Scored(cat_rollouts([r.batch for r in rounds], pad_token_id),
                    [p for r in rounds for p in r.problems], *(torch.cat([getattr(r, f) for r in rounds])
                                                               for f in ("gold", "raw", "scores")),
                    rounds[0].reward_metrics)
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
    batch, mask = data.batch, data.batch.response_mask
    baseline = None
    if "baseline_rewards" in needs:
        with timer("baseline"):
            baseline = greedy_baseline(cfg, state, data)
    ref_logprobs = values = None
    if state.reference is not None:
        with timer("reference"), torch.no_grad():
            ref_logprobs = map_micro_batches(batch, c.micro_batch_size, lambda b: response_logprobs(
                state.reference, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask,
                temperature=c.temperature)[0])
    if state.critic is not None:
        with timer("values"), torch.no_grad():
            values = map_micro_batches(batch, c.micro_batch_size, lambda b: response_values(
                state.critic, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask))
    return finish_experience(cfg, data, allgen, batch, metrics, timer, baseline=baseline, ref_logprobs=ref_logprobs,
                             values=values, kl_coef=state.kl_ctl.value)


def finish_experience(cfg: RunConfig, data: Scored, allgen: Scored, batch: RolloutBatch, metrics: dict,
                      timer: PhaseTimer, *, baseline, ref_logprobs, values, kl_coef: float) -> tuple[Experience, dict]:
    """From scored responses (`data`, with `batch` its rollouts and pi_old), the optional ReMax baseline, log pi_ref
    and V_old: token rewards, advantages (whitened, truncation-masked, checked), the Experience, and the step's
    metrics over everything generated (`allgen`). Shared by the local loop and backend ray."""
    c = cfg.rl
    scores, mask = data.scores, batch.response_mask
    with timer("advantages"):
        if c.kl_placement == "reward" and ref_logprobs is not None:
            token_rewards = kl_penalty_rewards(scores, batch.logprobs, ref_logprobs, mask, kl_coef,
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
    metrics.update(allgen.reward_metrics)
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
    if c.reward == "reward_model":
        metrics.update(gold_score=allgen.gold.mean().item(), rm_score_mean=allgen.raw.mean().item(),
                       rm_score_std=allgen.raw.std().item() if len(allgen.raw) > 1 else 0.0)
    if ref_logprobs is not None:  # KL(pi_old || pi_ref): k1 summed over each response, batch mean
        metrics["kl"] = ((batch.logprobs - ref_logprobs) * mask).sum(-1).mean().item()
    if values is not None:
        metrics["explained_variance"] = explained_variance(values, returns, mask)
        metrics["values_mean"] = masked_mean(values, mask).item()
    return exp, metrics
