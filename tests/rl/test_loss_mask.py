"""loss_mask apart from response_mask: tokens the model reads but is not trained on (tool output inside a
multi-turn response) are holes in the loss mask. Nothing may assume the mask is contiguous: the score sits on
the last trained token, the estimators and losses skip the holes, and the counts are the loss mask's."""

from __future__ import annotations

import torch

from posttrain.batch import RolloutBatch, last_token_index
from posttrain.rl.experience import ExperienceRecipe, ScoredRollouts, build_experience, outcome_token_rewards
from posttrain.rl.learner import actor_backward
from posttrain.rl.loop import RLRun, make_experience
from posttrain.tasks import ArithmeticTask
from posttrain.train.optim import PhaseTimer


def test_the_score_sits_on_the_last_trained_token_of_a_mask_with_holes():
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 0]
    rewards = outcome_token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert rewards.tolist() == [[0, 0, 0, 0, 2, 0], [0, 0, -1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]


def holes(response_mask: torch.Tensor) -> torch.Tensor:
    """The response mask with its second and third tokens taken out of the loss where a row has more than 3."""
    loss_mask = response_mask.clone()
    long = response_mask.sum(-1) > 3
    loss_mask[long, 1:3] = 0
    return loss_mask


def test_advantages_and_counts_follow_the_loss_mask(make_config, tmp_path):
    cfg = make_config(tmp_path, "rl.group_size=2", "rl.prompts_per_step=2")
    T = 6
    response_mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0] * 2, [1.0] * 2 + [0] * 4, [1.0] * 5 + [0]])
    batch = RolloutBatch(torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long),
                         torch.ones(4, T, dtype=torch.long), response_mask, torch.zeros(4, T),
                         torch.tensor([True, True, True, True]), loss_mask=holes(response_mask))
    data = ScoredRollouts(batch, [None] * 4, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                          torch.zeros(4), torch.zeros(4))
    exp, _ = build_experience(ExperienceRecipe.from_config(cfg.rl), data, batch, baseline=None, ref_logprobs=None,
                              values=None, kl_coef=0.0)
    assert torch.equal(exp.loss_mask, holes(response_mask)) and torch.equal(exp.response_mask, response_mask)
    assert (exp.advantages[exp.loss_mask == 0] == 0).all()  # nothing in the holes
    assert (exp.advantages[0, [0, 3, 4, 5]] > 0).all() and (exp.advantages[1, [0, 3]] < 0).all()
    assert exp.num_tokens == holes(response_mask).sum() == 6 + 4 + 2 + 5 - 6


def test_the_policy_gradient_ignores_what_sits_in_the_holes(make_config, tiny_model, tokenizer, tmp_path):
    """The hole tokens are read (they stay in the forward pass) but their advantages and old log-probs do not
    reach the gradient; without the holes the gradient is another one."""
    cfg = make_config(tmp_path, "rl.max_new_tokens=6", "rl.loss_agg=token-mean")
    run = RLRun.local(cfg, tiny_model, tokenizer, ArithmeticTask(cfg.task, cfg.seed))
    exp, _, _ = make_experience(run, 1, PhaseTimer())
    exp.advantages = torch.randn(exp.advantages.shape, generator=torch.Generator().manual_seed(0)) * exp.response_mask
    exp.loss_mask = holes(exp.response_mask)
    assert (exp.loss_mask != exp.response_mask).any(), "the test needs responses longer than 3 tokens"

    def gradient(e) -> dict[str, torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        actor_backward(cfg, run.learner, e)
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    base = gradient(exp)
    noisy = exp.select(slice(None))
    in_holes = (exp.loss_mask == 0) & (exp.response_mask != 0)
    noisy.advantages = torch.where(in_holes, torch.full_like(exp.advantages, 100.0), exp.advantages)
    noisy.old_logprobs = torch.where(in_holes, torch.full_like(exp.old_logprobs, -50.0), exp.old_logprobs)
    assert all(torch.allclose(base[n], g, atol=1e-7) for n, g in gradient(noisy).items())
    full = exp.select(slice(None))
    full.loss_mask = exp.response_mask
    assert any(not torch.allclose(base[n], g, atol=1e-7) for n, g in gradient(full).items())
