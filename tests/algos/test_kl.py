"""KL estimators vs plain-Python loops; KL controllers."""

import math

import pytest
import torch

from posttrain.algos import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from posttrain.algos.kl import kl_k1, kl_k2, kl_k3, kl_k3_straight_through

B, T = 5, 7

LOOPS = {
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
    "k3": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,
    "k3+": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,  # k3's value (its gradient: test_kl_gradients.py)
}


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k3+"])
@pytest.mark.parametrize("seed", [0, 1])
def test_estimators_match_loop(name, seed):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    got = KL_ESTIMATORS.get(name)(lp, ref)
    expected = [[LOOPS[name](lp[i, t].item(), ref[i, t].item()) for t in range(T)] for i in range(B)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_public_functions_are_the_registered_ones():
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3", "k3+")
    assert [KL_ESTIMATORS.get(n) for n in KL_ESTIMATORS.names()] == [kl_k1, kl_k2, kl_k3, kl_k3_straight_through]


def test_the_values_of_k1_and_k3_are_unbiased_on_samples_from_pi():
    g = torch.Generator().manual_seed(0)
    logits_pi, logits_ref = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    logp, logref = logits_pi.log_softmax(-1), logits_ref.log_softmax(-1)
    exact = (logp.exp() * (logp - logref)).sum().item()
    a = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    for est in (kl_k1, kl_k3):
        assert abs(est(logp[a], logref[a]).mean().item() - exact) < 0.02
    assert (kl_k3(logp[a], logref[a]) >= 0).all() and (kl_k2(logp[a], logref[a]) >= 0).all()


def test_k3_clamp_keeps_extreme_log_ratios_finite():
    lp = torch.tensor([[-1.0, -200.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, 0.0, -500.0]], dtype=torch.float64)
    out = kl_k3(lp, ref)
    assert torch.isfinite(out).all() and out[0, 0] == 0
    assert abs(out[0, 1].item() - (math.exp(20) - 21)) < 1e-3


def test_fixed_controller_never_moves():
    c = FixedKLController(0.05)
    c.update(10.0, 100)
    assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_controller_moves_towards_target():
    up, down = AdaptiveKLController(0.1, target=6.0, horizon=10_000), AdaptiveKLController(0.1, 6.0, 10_000)
    up.update(9.0, n_steps=256)  # KL too high -> stronger penalty
    down.update(torch.tensor(3.0), n_steps=256)  # KL too low -> weaker penalty
    assert up.value > 0.1 > down.value
    assert abs(up.value - 0.1 * (1 + 0.2 * 256 / 10_000)) < 1e-12  # error clipped at +0.2
    assert abs(down.value - 0.1 * (1 - 0.2 * 256 / 10_000)) < 1e-12  # 3/6 - 1 = -0.5 clipped at -0.2
    same = AdaptiveKLController(0.1, 6.0, 10_000)
    same.update(6.6, n_steps=100)  # error 0.1 inside the clip range
    assert abs(same.value - 0.1 * (1 + 0.1 * 100 / 10_000)) < 1e-12
    same.update(6.0, n_steps=100)
    assert abs(same.value - 0.1 * (1 + 0.1 * 100 / 10_000)) < 1e-12  # on target: unchanged


def test_adaptive_controller_state_round_trip():
    c = AdaptiveKLController(0.2, target=1.0, horizon=100)
    c.update(2.0, 10)
    d = AdaptiveKLController(1.0, target=5.0, horizon=7)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, c.target, c.horizon)
    c.update(0.5, 3), d.update(0.5, 3)
    assert c.value == d.value
