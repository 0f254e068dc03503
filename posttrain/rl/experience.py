"""From scored rollouts to experience: token rewards, advantages, the loss mask, the invariants, the step's
metrics. Everything here is a function of tensors and of `ExperienceRecipe`, what cfg.rl selects, resolved
once at setup (`ExperienceRecipe.from_config`), so nothing below branches on a config value per step.

B = sequences (prompts_per_step * group_size, contiguous groups), T = longest response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from posttrain.algos import ADVANTAGES, KL_ESTIMATORS, masked_mean, masked_whiten
from posttrain.algos.kl import KL_GRADIENT
from posttrain.algos.shaping import informative_groups, truncation_loss_mask
from posttrain.batch import RolloutBatch, cat_padded, last_token_index
from posttrain.buffer import Experience
from posttrain.config import RLConfig
from posttrain.invariants import check_finite, check_mask_not_empty
from posttrain.rollout.multiturn import trajectory_metrics

log = logging.getLogger(__name__)


@dataclass
class ScoredRollouts:
    """Rollouts and their outcome scores. B = sequences."""

    batch: RolloutBatch
    problems: list  # (B) the problem each row answers
    gold: Tensor  # (B,) the task's verifiable reward
    raw: Tensor  # (B,) the reward model's normalised score, or the gold when rl.reward == "task"
    penalty: Tensor  # (B,) the shaping added to raw: -missing_eos_penalty without EOS, + `overlong`
    overlong: Tensor  # (B,) DAPO's soft overlong penalty (<= 0; 0 when rl.overlong_buffer_frac is 0)
    reward_metrics: dict = field(default_factory=dict)  # data tasks: reward/errors, reward/<fn>, ...
    from_reward_model: bool = False  # raw is a reward model's score (not the gold)

    @property
    def scores(self) -> Tensor:  # (B,) raw + penalty: what the advantages see
        return self.raw + self.penalty

    def select(self, rows: list[int]) -> "ScoredRollouts":
        idx = torch.tensor(rows, dtype=torch.long)
        return ScoredRollouts(self.batch.select(idx), [self.problems[i] for i in rows], self.gold[idx], self.raw[idx],
                              self.penalty[idx], self.overlong[idx], self.reward_metrics, self.from_reward_model)

    @staticmethod
    def cat(parts: list["ScoredRollouts"], pad_token_id: int, reward_metrics: dict) -> "ScoredRollouts":
        """Parts (shares of a batch, or rounds of dynamic sampling) stacked in order."""
        return ScoredRollouts(cat_padded([p.batch for p in parts], pad_token_id), [x for p in parts for x in p.problems],
                              *(torch.cat([getattr(p, f) for p in parts]) for f in ("gold", "raw", "penalty", "overlong")),
                              reward_metrics, parts[0].from_reward_model)


def informative_rounds(c: RLConfig, sample_round: Callable[[int], ScoredRollouts], pad_token_id: int
                       ) -> tuple[ScoredRollouts, ScoredRollouts, dict]:
    """DAPO's dynamic sampling: rounds of prompts_per_step groups (`sample_round(k)`), keeping the groups whose
    scores are not all equal, until prompts_per_step are kept or dynamic_sampling_max_rounds rounds are spent; a
    batch still short is filled with dropped groups. -> (training batch, everything generated, metrics)."""
    G, N = c.group_size, c.prompts_per_step
    rounds: list[ScoredRollouts] = []
    kept: list[int] = []  # first row of each group, in the concatenation of all rounds
    dropped: list[int] = []
    while len(kept) < N and len(rounds) < c.dynamic_sampling_max_rounds:
        r = sample_round(len(rounds))
        offset = sum(len(x.batch) for x in rounds)
        for g, informative in enumerate(informative_groups(r.scores, G).tolist()):
            (kept if informative else dropped).append(offset + g * G)
        rounds.append(r)
    allgen = ScoredRollouts.cat(rounds, pad_token_id, rounds[0].reward_metrics)
    starts = kept[:N] + dropped[:max(0, N - len(kept))]
    chosen = allgen.select([s + j for s in starts for j in range(G)])
    metrics = {"ds_rounds": len(rounds), "ds_kept_frac": len(kept) / (len(rounds) * N),
               "ds_filled_groups": max(0, N - len(kept))}
    return chosen, allgen, metrics


def outcome_token_rewards(rewards: Tensor, loss_mask: Tensor) -> Tensor:
    """(B,) outcome rewards -> (B, T) token rewards: the score sits on each response's last token under the mask
    (holes allowed; an empty row has no token to carry it)."""
    token_rewards = torch.zeros_like(loss_mask)
    token_rewards[torch.arange(len(rewards)), last_token_index(loss_mask)] = rewards.to(token_rewards.dtype)
    return token_rewards * (loss_mask != 0)


def kl_penalty_rewards(scores, logprobs, ref_logprobs, loss_mask, beta: float, estimator: str = "k1"):
    """InstructGPT's token rewards: r_t = -beta * KL_t on every trained token, + score on the last one.

    scores (B,); logprobs, ref_logprobs, loss_mask (B, T) -> (B, T), zero off the mask.
    """
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs) * loss_mask
    return outcome_token_rewards(scores, loss_mask) - beta * kl


def _no_check(loss_mask: Tensor, advantages: Tensor, returns: Tensor) -> None:
    return None


def _check(loss_mask: Tensor, advantages: Tensor, returns: Tensor) -> None:
    check_mask_not_empty(loss_mask)
    check_finite(advantages, loss_mask, "advantages")
    check_finite(returns, loss_mask, "returns")


def _whiten(advantages: Tensor, mask: Tensor) -> Tensor:
    return masked_whiten(advantages, mask) * mask


@dataclass(frozen=True)
class ExperienceRecipe:
    """What cfg.rl selects for turning scored rollouts into experience, resolved once at setup."""

    group_size: int
    # (scores (B,), batch, ref_logprobs (B, T) | None, kl_coef) -> token rewards (B, T)
    token_rewards: Callable[[Tensor, RolloutBatch, Tensor | None, float], Tensor]
    # the registered estimator with its hyperparameters bound: (token_rewards, mask, values=, group_ids=,
    # baseline_rewards=, scores=, loss_mask=) -> (advantages, returns)
    estimator: Callable[..., tuple[Tensor, Tensor]]
    normalize: Callable[[Tensor, Tensor], Tensor]  # (advantages, mask) -> advantages: whitening or identity
    train_mask: Callable[[Tensor, Tensor], Tensor]  # (loss_mask, finished) -> loss mask: DAPO's filter or identity
    check: Callable[[Tensor, Tensor, Tensor], None]  # the invariants on (loss_mask, advantages, returns), or none

    @classmethod
    def from_config(cls, c: RLConfig) -> "ExperienceRecipe":
        if c.kl_placement == "reward" and c.kl_coef > 0:
            if KL_GRADIENT[c.kl_estimator]["reward"] != "reverse":
                log.warning("rl.kl_estimator=%s in the reward biases the gradient: E[%s * grad log pi] is not the "
                            "gradient of KL(pi || pi_ref); use rl.kl_estimator=k1 in the reward, or "
                            "rl.kl_placement=loss with k3+ (docs/algorithms.md)", c.kl_estimator, c.kl_estimator)

            def token_rewards(scores, batch, ref_logprobs, kl_coef):
                return kl_penalty_rewards(scores, batch.old_logprobs, ref_logprobs, batch.loss_mask, kl_coef,
                                          c.kl_estimator)
        else:
            def token_rewards(scores, batch, ref_logprobs, kl_coef):
                return outcome_token_rewards(scores, batch.loss_mask)
        return cls(c.group_size, token_rewards,
                   partial(ADVANTAGES.get(c.advantage), gamma=c.gamma, lam=c.lam, eps=c.adv_eps),
                   _whiten if c.whiten_advantages else (lambda adv, mask: adv),
                   truncation_loss_mask if c.mask_truncated else (lambda mask, finished: mask),
                   _check if c.check_invariants else _no_check)


def build_experience(recipe: ExperienceRecipe, data: ScoredRollouts, batch: RolloutBatch, *, baseline: Tensor | None,
                     ref_logprobs: Tensor | None, values: Tensor | None, kl_coef: float) -> tuple[Experience, Tensor]:
    """Token rewards, advantages (normalised, checked) and the Experience of scored rollouts `data` whose
    rollouts (with log pi_old and log pi_rollout) are `batch`, given the optional ReMax baseline (B,), log pi_ref
    and V_old (B, T). The estimator credits every chosen token (batch.loss_mask: a truncated response still counts
    in its group); the whitening takes its statistics over the tokens trained on (after DAPO's filter).
    -> (experience, returns before the loss mask (B, T), for the critic's explained variance)."""
    mask = batch.loss_mask
    train_mask = recipe.train_mask(mask, batch.finished)
    token_rewards = recipe.token_rewards(data.scores, batch, ref_logprobs, kl_coef)
    group_ids = torch.arange(len(batch) // recipe.group_size).repeat_interleave(recipe.group_size)
    advantages, returns = recipe.estimator(token_rewards, mask, values=values, group_ids=group_ids,
                                           baseline_rewards=baseline, scores=data.scores, loss_mask=train_mask)
    advantages = recipe.normalize(advantages, train_mask)
    recipe.check(train_mask, advantages, returns)
    exp = Experience(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, train_mask,
                     batch.old_logprobs * train_mask, advantages * train_mask, returns * train_mask, ref_logprobs,
                     values, batch.rollout_logprobs * train_mask)
    return exp, returns


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the trained tokens (1: the critic predicts the returns exactly)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


def policy_kl(batch: RolloutBatch, ref_logprobs: Tensor) -> float:
    """KL(pi_old || pi_ref) of a rollout batch: k1 summed over each response's trained tokens, batch mean. What
    the adaptive KL controller follows."""
    return ((batch.old_logprobs - ref_logprobs) * batch.loss_mask).sum(-1).mean().item()


def experience_metrics(data: ScoredRollouts, allgen: ScoredRollouts, batch: RolloutBatch, *, group_size: int,
                       baseline: Tensor | None, ref_logprobs: Tensor | None, values: Tensor | None,
                       returns: Tensor) -> dict[str, float]:
    """What the policy does, over everything generated this step (`allgen`: with dynamic sampling, more than
    the training batch `data`), and the critic's fit. Each key is defined in docs/metrics.md."""
    mask = batch.loss_mask
    grouped = allgen.gold.view(-1, group_size)
    metrics = dict(allgen.reward_metrics)
    metrics.update({"reward_mean": allgen.scores.mean().item(),
                    "reward_std": allgen.scores.std().item() if len(allgen.scores) > 1 else 0.0,
                    "solve_all_frac": (grouped.min(-1).values == 1).float().mean().item(),
                    "solve_none_frac": (grouped.max(-1).values == 0).float().mean().item(),
                    "response_length": batch.response_mask.sum(-1).mean().item(),
                    "truncated_frac": (~batch.finished).float().mean().item(),
                    "overlong_penalty_mean": data.overlong.mean().item()})
    metrics.update(trajectory_metrics(allgen.batch.trajectories))  # env/turns, env/tool_calls, ...
    if baseline is not None:
        metrics["baseline_reward_mean"] = baseline.mean().item()
    if allgen.from_reward_model:
        metrics.update(gold_score=allgen.gold.mean().item(), rm_score_mean=allgen.raw.mean().item(),
                       rm_score_std=allgen.raw.std().item() if len(allgen.raw) > 1 else 0.0)
    if ref_logprobs is not None:
        metrics["kl"] = policy_kl(batch, ref_logprobs)
    if values is not None:
        metrics["explained_variance"] = explained_variance(values, returns, mask)
        metrics["values_mean"] = masked_mean(values, mask).item()
    return metrics
