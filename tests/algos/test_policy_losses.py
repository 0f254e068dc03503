"""Policy losses vs plain-Python loops: per-token loss, gradient w.r.t. logprobs, metrics."""

import math

import pytest
import torch

from posttrain.algos import POLICY_LOSSES

B, T = 6, 8


def make_batch(seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logprobs = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logprobs, old, adv, mask


def run(name, logprobs, old, adv, mask, **kw):
    lp = logprobs.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES.get(name)(lp, old, adv, mask, **kw)
    loss.sum().backward()
    return loss, lp.grad, metrics


def clipped_token(ratio, a, lo, hi, c):
    """-> (loss, d loss / d ratio, clipped?, dual-clipped?) for one token, straight from the equation."""
    l1, l2 = -a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi)
    loss, dratio, clipped = max(l1, l2), (-a if l1 >= l2 else 0.0), l2 > l1
    dual = c is not None and a < 0 and loss > -c * a
    if dual:
        loss, dratio = -c * a, 0.0
    return loss, dratio, clipped, dual


def check(got, expected):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def loop_surrogate(ratios, adv, mask, lo, hi, c, dratio_dlogp):
    """Per-token loss, gradient and metrics given per-token ratios and d ratio / d logprob."""
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    n = n_clip = n_dual = 0
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                l, d, clipped, dual = clipped_token(ratios[i][t], adv[i][t], lo, hi, c)
                loss[i][t], grad[i][t] = l, d * dratio_dlogp[i][t]
                n, n_clip, n_dual = n + 1, n_clip + clipped, n_dual + dual
    return loss, grad, n_clip / n, n_dual / n


def loop_ratio_metrics(logprobs, old, ratios, mask):
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i][t]]
    return {
        "approx_kl": sum(old[i][t] - logprobs[i][t] for i, t in valid) / len(valid),
        "ratio_mean": sum(ratios[i][t] for i, t in valid) / len(valid),
        "ratio_max": max(ratios[i][t] for i, t in valid),
    }


CLIPS = [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.2, 3.0), (0.1, 0.3, 1.5)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo,hi,c", CLIPS)
def test_ppo_clip_matches_loop(seed, lo, hi, c):
    logprobs, old, adv, mask = make_batch(seed)
    loss, grad, metrics = run("ppo_clip", logprobs, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi,
                              dual_clip_c=c)
    lp, o, a, m = logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    ratios = [[math.exp(lp[i][t] - o[i][t]) for t in range(T)] for i in range(B)]
    exp_loss, exp_grad, clip_frac, dual_frac = loop_surrogate(ratios, a, m, lo, hi, c, ratios)
    check(loss, exp_loss)
    check(grad, exp_grad)
    expected = {"clip_frac": clip_frac, **loop_ratio_metrics(lp, o, ratios, m)}
    if c is not None:
        expected["dual_clip_frac"] = dual_frac
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert abs(metrics[k].item() - v) < 1e-6, k
        assert not metrics[k].requires_grad
    assert 0 < clip_frac < 1  # the random batch exercises both branches


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo,hi,c", CLIPS + [(3e-4, 4e-4, None)])
def test_gspo_matches_loop(seed, lo, hi, c):
    logprobs, old, adv, mask = make_batch(seed, scale=0.15)
    loss, grad, metrics = run("gspo", logprobs, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi,
                              dual_clip_c=c)
    lp, o, a, m = logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    ratios = [[0.0] * T for _ in range(B)]
    for i in range(B):
        diffs = [lp[i][t] - o[i][t] for t in range(T) if m[i][t]]
        s_i = math.exp(sum(diffs) / len(diffs)) if diffs else 1.0
        ratios[i] = [s_i] * T  # s_i,t = s_i in value; d s_i,t / d logprob_t = s_i
    exp_loss, exp_grad, clip_frac, _ = loop_surrogate(ratios, a, m, lo, hi, c, ratios)
    check(loss, exp_loss)
    check(grad, exp_grad)
    assert abs(metrics["clip_frac"].item() - clip_frac) < 1e-6
    for k, v in loop_ratio_metrics(lp, o, ratios, m).items():
        assert abs(metrics[k].item() - v) < 1e-6, k


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_matches_loop(seed):
    logprobs, old, adv, mask = make_batch(seed)
    loss, grad, metrics = run("reinforce", logprobs, old, adv, mask)
    lp, a, m = logprobs.tolist(), adv.tolist(), mask.tolist()
    check(loss, [[-a[i][t] * lp[i][t] if m[i][t] else 0.0 for t in range(T)] for i in range(B)])
    check(grad, [[-a[i][t] if m[i][t] else 0.0 for t in range(T)] for i in range(B)])
    assert abs(metrics["approx_kl"].item() - (old - logprobs)[mask == 1].mean().item()) < 1e-6


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_first_on_policy_step_has_ratio_one_and_no_clipping(name):
    _, old, adv, mask = make_batch(0)
    loss, grad, metrics = run(name, old.clone(), old, adv, mask, dual_clip_c=3.0)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics.get("dual_clip_frac", torch.tensor(0.0)).item() == 0.0
    assert abs(metrics["ratio_mean"].item() - 1) < 1e-12 and abs(metrics["ratio_max"].item() - 1) < 1e-12
    assert metrics["approx_kl"].item() == 0.0
    # the on-policy gradient is the vanilla policy gradient -A * dlogp
    torch.testing.assert_close(loss, -adv * mask)
    torch.testing.assert_close(grad, -adv * mask)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_dual_clip_bounds_loss_for_negative_advantages(name):
    _, old, _, mask = make_batch(0)
    adv = -torch.rand(B, T, dtype=torch.float64) - 0.1  # all negative
    logprobs = old + 3.0  # ratio e^3 ~ 20: a bad action made far more likely
    c = 3.0
    free, _, _ = run(name, logprobs, old, adv, mask)
    loss, grad, metrics = run(name, logprobs, old, adv, mask, dual_clip_c=c)
    valid = mask == 1
    assert (free[valid] > c * adv.abs()[valid]).all()  # unbounded without the dual clip
    torch.testing.assert_close(loss, c * adv.abs() * mask)  # capped at c * |A|
    assert (grad == 0).all()
    assert metrics["dual_clip_frac"].item() == 1.0
    # positive advantages are never touched by the dual clip
    free_pos, _, _ = run(name, logprobs, old, -adv, mask)
    loss_pos, _, _ = run(name, logprobs, old, -adv, mask, dual_clip_c=c)
    torch.testing.assert_close(free_pos, loss_pos)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_zero_length_and_padding_garbage_give_no_nan(name):
    logprobs, old, adv, mask = make_batch(0)
    pad = mask == 0
    logprobs = logprobs.masked_fill(pad, float("-inf"))
    old = old.masked_fill(pad, float("nan"))
    adv = adv.masked_fill(pad, float("nan"))
    for m in (mask, torch.zeros_like(mask)):
        loss, grad, metrics = run(name, logprobs, old, adv, m, dual_clip_c=2.0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (loss[m == 0] == 0).all()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_dual_clip_c_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip_c"):
        POLICY_LOSSES.get("ppo_clip")(*make_batch(0), dual_clip_c=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28), (0.9, 0.1)])
def test_cispo_matches_loop(seed, lo, hi):
    logprobs, old, adv, mask = make_batch(seed)
    loss, grad, metrics = run("cispo", logprobs, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi)
    lp, o, a, m = logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    exp_loss, exp_grad = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    clipped, ratios = [], [[math.exp(lp[i][t] - o[i][t]) for t in range(T)] for i in range(B)]
    for i in range(B):
        for t in range(T):
            if m[i][t]:
                w = min(max(ratios[i][t], 1 - lo), 1 + hi)  # a constant: no gradient through the weight
                exp_loss[i][t], exp_grad[i][t] = -w * a[i][t] * lp[i][t], -w * a[i][t]
                clipped.append(w != ratios[i][t])
    check(loss, exp_loss)
    check(grad, exp_grad)
    assert abs(metrics["clip_frac"].item() - sum(clipped) / len(clipped)) < 1e-6
    for k, v in loop_ratio_metrics(lp, o, ratios, m).items():
        assert abs(metrics[k].item() - v) < 1e-6, k
    assert 0 < sum(clipped) < len(clipped)  # both branches


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.4, 0.4), (0.1, 0.3)])
@pytest.mark.parametrize("per_token", [False, True])
def test_gmpo_matches_loop(seed, lo, hi, per_token):
    logprobs, old, adv, mask = make_batch(seed)
    if not per_token:  # the paper's setting: one advantage per sequence
        adv = adv[:, :1].expand(B, T).clone()
    loss, grad, metrics = run("gmpo", logprobs, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi)
    lp, o, a, m = logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    exp_loss, exp_grad = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    active = []
    for i in range(B):
        valid = [t for t in range(T) if m[i][t]]
        if not valid:
            continue
        c = {}
        for t in valid:  # PPO's pessimistic side, in log space
            d = lp[i][t] - o[i][t]
            clip = min(max(d, -lo), hi)
            c[t] = min(d, clip) if a[i][t] >= 0 else max(d, clip)
            active.append(c[t] != d)
        s = math.exp(sum(c.values()) / len(valid))  # geometric mean of the (clipped) ratios
        total_a = sum(a[i][t] for t in valid)
        for t in valid:
            exp_loss[i][t] = -a[i][t] * s
            unclipped = c[t] == lp[i][t] - o[i][t]
            exp_grad[i][t] = -total_a * s / len(valid) if unclipped else 0.0  # d sum_t loss_t / d logprob_t
    check(loss, exp_loss)
    check(grad, exp_grad)
    assert abs(metrics["clip_frac"].item() - sum(active) / len(active)) < 1e-6
    assert 0 < sum(active) < len(active)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_loop(seed, tau_pos, tau_neg):
    logprobs, old, adv, mask = make_batch(seed, scale=1.0)
    loss, grad, metrics = run("sapo", logprobs, old, adv, mask, sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)
    lp, o, a, m = logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    exp_loss, exp_grad = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    gates, ratios = [], [[math.exp(lp[i][t] - o[i][t]) for t in range(T)] for i in range(B)]
    for i in range(B):
        for t in range(T):
            if m[i][t]:
                rho, tau = ratios[i][t], tau_pos if a[i][t] > 0 else tau_neg
                sig = 1 / (1 + math.exp(-tau * (rho - 1)))
                exp_loss[i][t] = -sig * 4 / tau * a[i][t]  # -f(rho) A, f(x) = sigmoid(tau (x - 1)) 4 / tau
                exp_grad[i][t] = -4 * sig * (1 - sig) * rho * a[i][t]  # f'(rho) * d rho / d logprob
                gates.append(4 * sig * (1 - sig))
    check(loss, exp_loss)
    check(grad, exp_grad)
    assert abs(metrics["gate_mean"].item() - sum(gates) / len(gates)) < 1e-6
    for k, v in loop_ratio_metrics(lp, o, ratios, m).items():
        assert abs(metrics[k].item() - v) < 1e-6, k


@pytest.mark.parametrize("name", ["cispo", "gmpo", "sapo"])
def test_new_losses_give_the_vanilla_policy_gradient_on_policy(name):
    """At ratio 1 (the first minibatch) every one of them has PPO's on-policy gradient -A grad log pi of the
    summed per-token loss (GMPO: each of a sequence's |o_i| tokens carries -A_i s_i, whose gradient is
    -A_i / |o_i| on every token, |o_i| times)."""
    _, old, adv, mask = make_batch(0)
    adv = adv[:, :1].expand(B, T).clone()  # per-sequence advantages (GMPO's setting)
    _, grad, metrics = run(name, old.clone(), old, adv, mask)
    torch.testing.assert_close(grad, -adv * mask)
    assert metrics["approx_kl"].item() == 0.0
