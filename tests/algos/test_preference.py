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


# ------------------------------------------------------------------ DPO, IPO, SLiC-HF, SimPO on policy log-probs

from posttrain.algos.preference import PREFERENCE_SPECS, implicit_rewards  # noqa: E402

T = 7


def make_logprobs(seed):
    """Random per-token log-probs of B chosen and B rejected responses under pi_theta and pi_ref, with masks
    of random lengths 1..T (as right-padded responses)."""
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(2, B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(2, B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (2, B), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).to(torch.float64)
    return logp, ref, mask


def loop_reward(logp, ref, mask, use_reference, length_normalize):
    """One sequence's reward from plain Python lists."""
    total, count = 0.0, 0
    for lp, rf, m in zip(logp, ref, mask):
        if m:
            total += lp - (rf if use_reference else 0.0)
            count += 1
    return total / count if length_normalize else total


def loop_loss(name, h, beta, margin):
    """Each loss of the gap h = r_w - r_l, straight from its paper's equation."""
    if name == "dpo" or name == "simpo":
        return -math.log(1.0 / (1.0 + math.exp(-(beta * h - margin))))
    if name == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if name == "slic":
        return max(0.0, margin - beta * h)
    raise AssertionError(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo"])
@pytest.mark.parametrize("beta, margin", [(0.1, 0.0), (0.5, 0.3), (2.0, 1.0)])
def test_policy_preference_losses_match_loop(seed, name, beta, margin):
    spec = PREFERENCE_SPECS[name]
    logp, ref, mask = make_logprobs(seed)
    logp = logp.clone().requires_grad_(True)
    ref_sums = (ref * mask).sum(-1) if spec.use_reference else [None, None]  # the recipe passes (B,) sums
    chosen = implicit_rewards(logp[0], mask[0], ref_sums[0], length_normalize=spec.length_normalize)
    rejected = implicit_rewards(logp[1], mask[1], ref_sums[1], length_normalize=spec.length_normalize)
    loss, metrics = PREFERENCE_LOSSES.get(name)(chosen, rejected, beta=beta, margin=margin)
    loss.sum().backward()

    expected, gaps, grads = [], [], []
    for i in range(B):
        r = [loop_reward(logp[s, i].tolist(), ref[s, i].tolist(), mask[s, i].tolist(), spec.use_reference,
                         spec.length_normalize) for s in (0, 1)]
        h = r[0] - r[1]
        expected.append(loop_loss(name, h, beta, margin))
        gaps.append(h)
        eps = 1e-6  # d loss / d h by central differences of the loop's loss
        grads.append((loop_loss(name, h + eps, beta, margin) - loop_loss(name, h - eps, beta, margin)) / (2 * eps))
    assert loss.shape == (B,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    # d loss_i / d logp_{w,i,t} = d loss / d h * m_t (/ |y_w| when length-normalised); rejected: the negative
    n_w = mask[0].sum(-1) if spec.length_normalize else torch.ones(B, dtype=torch.float64)
    n_l = mask[1].sum(-1) if spec.length_normalize else torch.ones(B, dtype=torch.float64)
    dh = torch.tensor(grads, dtype=torch.float64)
    torch.testing.assert_close(logp.grad[0], (dh / n_w).unsqueeze(-1) * mask[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logp.grad[1], -(dh / n_l).unsqueeze(-1) * mask[1], atol=1e-5, rtol=0)
    assert metrics["margin"].item() == pytest.approx(sum(gaps) / B, abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(sum(h > 0 for h in gaps) / B)


def test_implicit_rewards_per_token_reference_equals_summed():
    logp, ref, mask = make_logprobs(5)
    summed = implicit_rewards(logp[0], mask[0], (ref[0] * mask[0]).sum(-1))
    torch.testing.assert_close(implicit_rewards(logp[0], mask[0], ref[0]), summed)
    # padding carries no weight, whatever it holds
    garbage = torch.where(mask[0] > 0, logp[0], torch.full_like(logp[0], -1e4))
    torch.testing.assert_close(implicit_rewards(garbage, mask[0], ref[0]), summed)


def test_dpo_starts_at_log2_and_ipo_is_minimal_at_its_target_gap():
    zero = torch.zeros(4, requires_grad=True)
    loss, _ = PREFERENCE_LOSSES.get("dpo")(zero, torch.zeros(4), beta=0.1)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2.0)))  # pi = pi_ref: -log sigmoid(0)
    beta = 0.25
    target = torch.full((3,), 1 / (2 * beta), requires_grad=True)  # h = 1 / (2 beta): IPO's minimum
    loss, _ = PREFERENCE_LOSSES.get("ipo")(target, torch.zeros(3), beta=beta, margin=5.0)  # margin unused
    loss.sum().backward()
    assert loss.abs().max().item() < 1e-12 and target.grad.abs().max().item() < 1e-12


def test_slic_stops_pushing_once_the_gap_exceeds_delta():
    chosen = torch.tensor([3.0, 0.5, -1.0], requires_grad=True)
    loss, _ = PREFERENCE_LOSSES.get("slic")(chosen, torch.zeros(3), beta=1.0, margin=1.0)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([0.0, 0.5, 2.0]))
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -1.0, -1.0]))


def test_every_policy_loss_has_a_spec_and_the_registry_signature():
    assert set(PREFERENCE_SPECS) == set(PREFERENCE_LOSSES.names()) - {"bradley_terry"}
    for name in PREFERENCE_LOSSES.names():
        params = inspect.signature(PREFERENCE_LOSSES.get(name)).parameters
        assert list(params) == ["chosen_rewards", "rejected_rewards", "beta", "margin"], name
        assert params["beta"].kind is params["margin"].kind is inspect.Parameter.KEYWORD_ONLY
        doc = PREFERENCE_LOSSES.get(name).__doc__
        assert "loss =" in doc and "20" in doc, name  # the equation and the paper's year


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo"])
def test_policy_losses_check_shapes_and_upcast(name):
    with pytest.raises(ValueError, match="shape"):
        PREFERENCE_LOSSES.get(name)(torch.zeros(4, 1), torch.zeros(4, 1))
    loss, _ = PREFERENCE_LOSSES.get(name)(torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16),
                                          beta=0.5, margin=0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
