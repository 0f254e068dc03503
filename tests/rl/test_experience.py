"""build_experience against plain loops where the estimator, the KL placement and DAPO's filter meet: REINFORCE++
w/ Baseline with the KL in the reward, the whitening statistics under rl.mask_truncated, and the setup warning for
a biased KL estimator in the reward."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from posttrain.batch import RolloutBatch
from posttrain.rl.experience import ExperienceRecipe, ScoredRollouts, build_experience

G, B, T = 4, 8, 5  # two groups of four


def scored(seed: int, finished: list[bool] | None = None) -> tuple[ScoredRollouts, torch.Tensor]:
    """Ragged responses with random log-probs and scores; -> (the scored rollouts, log pi_ref (B, T))."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1, 4, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logprobs = -torch.rand(B, T, generator=g) * 2 * mask
    ref = -torch.rand(B, T, generator=g) * 2 * mask
    done = torch.tensor(finished if finished is not None else [True] * B)
    batch = RolloutBatch(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                         torch.ones(B, T, dtype=torch.long), mask, logprobs, done)
    scores = torch.randn(B, generator=g)
    return ScoredRollouts(batch, [None] * B, scores, scores, torch.zeros(B), torch.zeros(B)), ref


def experience(cfg, data, ref):
    exp, _ = build_experience(ExperienceRecipe.from_config(cfg.rl), data, data.batch, baseline=None,
                              ref_logprobs=ref, values=None, kl_coef=cfg.rl.kl_coef)
    return exp


def whitened(a: list[list[float]], mask: list[list[float]], eps: float) -> list[list[float]]:
    tokens = [a[i][t] for i in range(B) for t in range(T) if mask[i][t]]
    mu = sum(tokens) / len(tokens)
    var = sum((x - mu) ** 2 for x in tokens) / len(tokens)
    return [[(a[i][t] - mu) / math.sqrt(var + eps) if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_baseline_subtracts_the_group_mean_of_the_score_not_of_the_kl(tmp_path, make_config, seed):
    """OpenRLHF's order (REINFORCE++ w/ Baseline): score - group mean of the scores, then the KL penalties
    -beta k1_t on every token, then the return-to-go, then the global whitening. Subtracting the group mean of
    the total reward (KL included) gives other numbers (max difference printed)."""
    beta = 0.5
    cfg = make_config(tmp_path, "rl.advantage=reinforce_pp_baseline", f"rl.group_size={G}", "rl.prompts_per_step=2",
                      "rl.kl_placement=reward", "rl.kl_estimator=k1", f"rl.kl_coef={beta}")
    data, ref = scored(seed)
    got = experience(cfg, data, ref).advantages
    lp, rf, m = data.batch.old_logprobs.tolist(), ref.tolist(), data.batch.loss_mask.tolist()
    s = data.scores.tolist()
    a, a_total = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for i in range(B):
        group = range(i // G * G, i // G * G + G)
        valid = [t for t in range(T) if m[i][t]]
        kl = {t: lp[i][t] - rf[i][t] for t in valid}
        shaped = s[i] - sum(s[j] for j in group) / G  # the outcome score's baseline: scores only
        for t in valid:
            a[i][t] = shaped - beta * sum(kl[u] for u in valid if u >= t)
        totals = [s[j] - beta * sum(lp[j][t] - rf[j][t] for t in range(T) if m[j][t]) for j in group]
        for t in valid:  # the form this replaces: the group mean of the total reward
            a_total[i][t] = s[i] - beta * sum(kl[u] for u in valid if u >= t) - sum(totals) / G
    expected = torch.tensor(whitened(a, m, cfg.rl.adv_eps))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    other = torch.tensor(whitened(a_total, m, cfg.rl.adv_eps))
    assert (other - expected).abs().max() > 1e-2
    print(f"seed {seed}: max |A(score baseline) - A(total-reward baseline)| = {(other - expected).abs().max():.4f}")


@pytest.mark.parametrize("advantage,whiten", [("grpo", "true"), ("reinforce_pp", "false"),
                                              ("reinforce_pp_baseline", "false")])
def test_whitening_takes_the_statistics_of_the_trained_tokens(tmp_path, make_config, advantage, whiten):
    """rl.mask_truncated takes truncated responses out of the loss: the whitened advantages of the tokens trained on
    have mean 0 and variance 1 (their statistics, not those of every response token)."""
    cfg = make_config(tmp_path, f"rl.advantage={advantage}", f"rl.whiten_advantages={whiten}", "rl.mask_truncated=true",
                      f"rl.group_size={G}", "rl.prompts_per_step=2", "rl.kl_coef=0")
    data, ref = scored(3, finished=[True, False, True, True, False, True, True, False])
    data.raw[~data.batch.finished] += 3.0  # the truncated ones would pull the mean
    exp = experience(cfg, data, None)
    trained = exp.loss_mask.bool()
    assert not trained[~data.batch.finished].any() and trained.sum() > 0
    a = exp.advantages[trained].double()
    assert abs(a.mean().item()) < 1e-5
    assert abs(a.var(unbiased=False).item() - 1) < 1e-4


@pytest.mark.parametrize("estimator,placement,warns", [("k1", "reward", False), ("k2", "reward", True),
                                                        ("k3", "reward", True), ("k3+", "reward", True),
                                                        ("k3+", "loss", False), ("k3", "loss", False)])
def test_a_biased_kl_estimator_in_the_reward_warns_once_at_setup(tmp_path, make_config, caplog, estimator,
                                                                 placement, warns):
    cfg = make_config(tmp_path, f"rl.kl_estimator={estimator}", f"rl.kl_placement={placement}")
    with caplog.at_level(logging.WARNING, logger="posttrain.rl.experience"):
        recipe = ExperienceRecipe.from_config(cfg.rl)
        data, ref = scored(0)
        for _ in range(2):  # steps do not warn
            build_experience(recipe, data, data.batch, baseline=None, ref_logprobs=ref, values=None, kl_coef=0.1)
    records = [r for r in caplog.records if "kl_estimator" in r.getMessage()]
    assert len(records) == int(warns)
    if warns:
        message = records[0].getMessage()
        assert f"rl.kl_estimator={estimator} in the reward" in message and "k1" in message
