"""Every algorithm on multi-turn batches (environment tokens are holes in the loss mask): GAE equals a
brute-force reference that drops the environment tokens; PPO's KL reward and GAE ignore whatever sits at
environment positions (their values, reference log-probs); the GRPO family broadcasts the outcome over the
sampled tokens only; environment tokens get no gradient."""

from __future__ import annotations

import torch

from posttrain.algos.advantages import gae
from posttrain.rl.experience import build_experience
from posttrain.rl.learner import actor_backward
from posttrain.rl.loop import RLRun, make_experience
from posttrain.tasks import ArithmeticTask
from posttrain.train.optim import PhaseTimer
from tests.rollout.helpers import likely_to_stop


def gae_without_holes(rewards, values, mask, gamma, lam):
    """The reference: each row's environment tokens (and padding) taken out, plain GAE over what is left (V and A
    after the last token 0), put back in place; 0 elsewhere."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.size(0)):
        idx = mask[i].nonzero().squeeze(1).tolist()
        r, v = [float(rewards[i, t]) for t in idx], [float(values[i, t]) for t in idx]
        a, out = 0.0, [0.0] * len(idx)
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            a = r[k] + gamma * next_v - v[k] + gamma * lam * a
            out[k] = a
        for k, t in enumerate(idx):
            adv[i, t] = out[k]
    return adv, (adv + values) * mask


def test_gae_over_a_mask_with_holes_equals_gae_on_the_sampled_tokens_alone():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 12
    mask = (torch.rand(B, T, generator=g) < 0.6).float()
    mask[:, -2:] = 0  # trailing padding too
    mask[0] = 0  # an empty row
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = gae_without_holes(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    # what sits in the holes does not matter
    noisy = torch.where(mask.bool(), values, torch.full_like(values, 1e3))
    assert torch.allclose(gae(rewards, noisy, mask)[0], gae(rewards, values, mask)[0], atol=1e-5)


def multiturn_run(make_config, tiny_model, tokenizer, tmp_path, *overrides):
    likely_to_stop(tiny_model, tokenizer.eos_token_id)
    cfg = make_config(tmp_path, "env.name=reflection", "env.kwargs={feedback: wrong}", "rl.max_new_tokens=5",
                      "rl.missing_eos_penalty=1.0", *overrides)
    return cfg, RLRun.local(cfg, tiny_model, tokenizer, ArithmeticTask(cfg.task, cfg.seed))


def env_tokens(batch) -> torch.Tensor:
    holes = (batch.response_mask != 0) & (batch.loss_mask == 0)
    assert holes.sum() >= 10, "the test needs multi-turn trajectories"
    return holes


def test_ppo_on_multiturn_batches_reads_values_and_kl_at_sampled_tokens_only(make_config, tiny_model, tokenizer,
                                                                             tmp_path):
    cfg, run = multiturn_run(make_config, tiny_model, tokenizer, tmp_path, "rl.preset=ppo", "rl.advantage=gae",
                             "rl.kl_placement=reward", "rl.kl_estimator=k1", "rl.kl_coef=0.05")
    data, _, _ = run.sample(1, PhaseTimer())
    batch, ref_logprobs, values = run.reference(data.batch, PhaseTimer())
    holes = env_tokens(batch)
    assert values is not None and ref_logprobs is not None

    def experience(ref, vals):
        return build_experience(run.recipe, data, batch, baseline=None, ref_logprobs=ref, values=vals,
                                kl_coef=0.05)[0]

    exp = experience(ref_logprobs, values)
    assert (exp.advantages[holes] == 0).all() and (exp.returns[holes] == 0).all()
    # the KL penalty sits on sampled tokens only: the token rewards are zero in the holes whatever log pi_ref is
    token_rewards = run.recipe.token_rewards(data.scores, batch, ref_logprobs, 0.05)
    assert (token_rewards[holes] == 0).all() and (token_rewards[~holes & (batch.loss_mask != 0)] != 0).any()
    # GAE (before whitening) equals the reference that drops the environment tokens
    raw, _ = gae(token_rewards, values, batch.loss_mask, gamma=cfg.rl.gamma, lam=cfg.rl.lam)
    assert torch.allclose(raw, gae_without_holes(token_rewards, values, batch.loss_mask, cfg.rl.gamma,
                                                 cfg.rl.lam)[0], atol=1e-5)
    # values and reference log-probs at environment positions change nothing
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)) * 100
    other = experience(torch.where(holes, ref_logprobs + noise, ref_logprobs), torch.where(holes, values + noise, values))
    assert torch.allclose(other.advantages, exp.advantages, atol=1e-5)
    assert torch.allclose(other.returns, exp.returns, atol=1e-5)
    metrics = run.step()  # a whole PPO step: the ratio invariant holds, the critic trains
    assert metrics["first_log_ratio_max"] <= cfg.rl.ratio_tolerance and metrics["value_loss"] > 0


def test_grpo_broadcasts_the_outcome_over_sampled_tokens_and_env_tokens_get_no_gradient(make_config, tiny_model,
                                                                                         tokenizer, tmp_path):
    cfg, run = multiturn_run(make_config, tiny_model, tokenizer, tmp_path, "rl.kl_coef=0.1")
    exp, _, _ = make_experience(run, 1, PhaseTimer())
    holes = env_tokens(exp)
    sampled = exp.loss_mask != 0
    for i in range(len(exp)):  # one advantage per trajectory, on its sampled tokens only
        row = exp.advantages[i][sampled[i]]
        assert torch.allclose(row, row[:1].expand_as(row)) if len(row) else True
    assert (exp.advantages[holes] == 0).all() and (exp.advantages != 0).any()

    def gradient(e) -> dict[str, torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        actor_backward(cfg, run.learner, e)
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    base = gradient(exp)
    assert any(g.abs().sum() > 0 for g in base.values())
    noisy = exp.select(slice(None))  # log-probs (old, rollout, reference) and advantages changed at env tokens
    for name, value in (("old_logprobs", -30.0), ("rollout_logprobs", -30.0), ("ref_logprobs", 5.0),
                        ("advantages", 100.0)):
        setattr(noisy, name, torch.where(holes, torch.full_like(exp.advantages, value), getattr(exp, name)))
    assert all(torch.allclose(base[n], g, atol=1e-7) for n, g in gradient(noisy).items())
    trained = exp.select(slice(None))  # the same tokens in the loss: another gradient
    trained.loss_mask = exp.response_mask
    trained.advantages = torch.where(holes, torch.ones_like(exp.advantages), exp.advantages)
    assert any(not torch.allclose(base[n], g, atol=1e-7) for n, g in gradient(trained).items())
