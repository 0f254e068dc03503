"""Preference losses vs a plain-Python loop: per-pair loss, gradients, margin, metrics, shape checks."""

import inspect
import math

import pytest
import torch

from posttrain.algos.preference import PREFERENCE_LOSSES, bradley_terry

B = 16


def make_rewards(seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    chosen = scale * torch.randn(B, generator=g, dtype=torch.float64)
    rejected = scale * torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64) * 2
    return chosen, rejected, margin


def loop_bt(chosen, rejected, margin, beta):
    """-> (losses, d loss / d chosen) for each pair, straight from loss = -log(1 / (1 + exp(-x)))."""
    losses, grads = [], []
    for rc, rr, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist()):
        x = beta * (rc - rr) - m
        losses.append(-math.log(1.0 / (1.0 + math.exp(-x))))
        grads.append(-beta / (1.0 + math.exp(x)))  # -beta * sigmoid(-x)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def run(chosen, rejected, **kw):
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    loss, metrics = PREFERENCE_LOSSES.get("bradley_terry")(c, r, **kw)
    loss.sum().backward()
    return loss, c.grad, r.grad, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta, use_margin", [(1.0, False), (1.0, True), (0.1, True), (2.5, False)])
def test_bradley_terry_matches_loop(seed, beta, use_margin):
    chosen, rejected, margin = make_rewards(seed)
    if not use_margin:
        margin = torch.zeros(B, dtype=torch.float64)
    loss, grad_c, grad_r, _ = run(chosen, rejected, beta=beta, margin=margin if use_margin else None)
    expected_loss, expected_grad = loop_bt(chosen, rejected, margin, beta)
    assert loss.shape == (B,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_c, expected_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_r, -expected_grad, atol=1e-6, rtol=0)


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected, _ = make_rewards(3)
    _, grad_c, grad_r, _ = run(chosen, rejected)
    assert (grad_c < 0).all() and (grad_r > 0).all()  # a descent step moves r_c up and r_r down
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    bradley_terry(c, r)[0].mean().backward()
    with torch.no_grad():
        before = bradley_terry(chosen, rejected)[0].mean()
        after = bradley_terry(chosen - 0.1 * c.grad, rejected - 0.1 * r.grad)[0].mean()
    assert after < before


def test_margin_raises_the_loss_and_keeps_pushing_won_pairs():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.5, 0.0])
    plain, grad_plain, _, _ = run(chosen, rejected)
    with_margin, grad_margin, _, _ = run(chosen, rejected, margin=torch.tensor([1.0, 1.0]))
    assert (with_margin > plain).all()
    assert (grad_margin.abs() > grad_plain.abs()).all()
    # a float margin is the same margin on every pair; a zero margin is no margin
    torch.testing.assert_close(run(chosen, rejected, margin=1.0)[0], with_margin)
    torch.testing.assert_close(run(chosen, rejected, margin=0.0)[0], plain)
    # the loss is a function of beta * gap - margin only
    torch.testing.assert_close(bradley_terry(chosen + 1.0, rejected, margin=1.0)[0], plain)


def test_extreme_gaps_are_finite():
    chosen = torch.tensor([4096.0, -4096.0, 0.0], dtype=torch.bfloat16)
    rejected = torch.zeros(3, dtype=torch.bfloat16)
    loss, grad_c, _, _ = run(chosen, rejected)
    assert loss.dtype == torch.float32  # bf16 rewards are upcast
    assert torch.isfinite(loss).all() and torch.isfinite(grad_c).all()
    torch.testing.assert_close(loss, torch.tensor([0.0, 4096.0, math.log(2.0)]))


def test_metrics():
    chosen = torch.tensor([1.0, 2.0, 0.0, -1.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, -2.0])  # wins, loses, tie (counts as wrong), wins
    _, metrics = bradley_terry(chosen.requires_grad_(True), rejected, margin=5.0)
    assert set(metrics) == {"accuracy", "margin", "chosen_reward", "rejected_reward"}
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    assert metrics["margin"].item() == pytest.approx(0.25)  # mean(r_c - r_r); the margin argument is not in it
    assert metrics["chosen_reward"].item() == pytest.approx(0.5)
    assert metrics["rejected_reward"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("chosen, rejected, margin", [
    (torch.zeros(4, 1), torch.zeros(4, 1), None),  # (B, 1) from a scalar head: squeeze it first
    (torch.zeros(4), torch.zeros(3), None),
    (torch.zeros(4), torch.zeros(4), torch.zeros(4, 1)),  # would broadcast to (4, 4)
    (torch.zeros(4), torch.zeros(4), torch.zeros(3)),
])
def test_shape_errors(chosen, rejected, margin):
    with pytest.raises(ValueError, match="shape"):
        bradley_terry(chosen, rejected, margin=margin)


def test_registry_signature():
    assert PREFERENCE_LOSSES.get("bradley_terry") is bradley_terry
    params = inspect.signature(bradley_terry).parameters
    assert list(params) == ["chosen_rewards", "rejected_rewards", "beta", "margin"]
    assert params["beta"].kind is params["margin"].kind is inspect.Parameter.KEYWORD_ONLY
