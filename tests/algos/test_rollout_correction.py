"""Rollout corrections and the mismatch metrics vs plain-Python loops; the exact no-op on identical log-probs."""

import math

import pytest
import torch

from posttrain.algos import ROLLOUT_CORRECTIONS
from posttrain.algos.rollout_correction import LEVELS, correction_metrics, rollout_mismatch

B, T = 6, 8


def make_batch(seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    rollout = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    return old * mask, rollout * mask, mask


LOOP_WEIGHTS = {
    "tis": lambda rho, c: min(rho, c),
    "mis": lambda rho, c: rho if rho <= c else 0.0,
    "icepop": lambda rho, c: rho if 1 / c <= rho <= c else 0.0,
}


def loop_log_ratios(old, rollout, mask, level):
    o, r, m = old.tolist(), rollout.tolist(), mask.tolist()
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        seq = max(-20.0, min(20.0, sum(o[i][t] - r[i][t] for t in range(T) if m[i][t])))
        for t in range(T):
            if m[i][t]:
                out[i][t] = o[i][t] - r[i][t] if level == "token" else seq
    return out


def test_every_correction_has_a_loop():
    assert set(ROLLOUT_CORRECTIONS.names()) == set(LOOP_WEIGHTS)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(LOOP_WEIGHTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [2.0, 1.5])
def test_weights_match_loop(seed, name, level, cap):
    old, rollout, mask = make_batch(seed, scale=0.5 if level == "token" else 0.2)
    log_ratio = LEVELS[level](old, rollout, mask)
    expected_lr = loop_log_ratios(old, rollout, mask, level)
    torch.testing.assert_close(log_ratio, torch.tensor(expected_lr, dtype=torch.float64), atol=1e-12, rtol=0)
    weights = ROLLOUT_CORRECTIONS.get(name)(log_ratio, mask, cap=cap)
    m = mask.tolist()
    expected = [[LOOP_WEIGHTS[name](math.exp(expected_lr[i][t]), cap) if m[i][t] else 0.0 for t in range(T)]
                for i in range(B)]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not weights.requires_grad
    changed = [expected[i][t] != math.exp(expected_lr[i][t]) for i in range(B) for t in range(T) if m[i][t]]
    metrics = correction_metrics(weights, log_ratio, mask)
    assert abs(metrics["rollout_is_changed_frac"].item() - sum(changed) / len(changed)) < 1e-12
    valid = [expected[i][t] for i in range(B) for t in range(T) if m[i][t]]
    assert abs(metrics["rollout_is_weight_mean"].item() - sum(valid) / len(valid)) < 1e-12
    if level == "token":
        assert 0 < sum(changed) < len(changed)  # the batch exercises both branches


@pytest.mark.parametrize("name", sorted(LOOP_WEIGHTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identical_logprobs_give_weights_exactly_one(name, level):
    old, _, mask = make_batch(0)
    loss = torch.randn(B, T, dtype=torch.float64) * mask
    weights = ROLLOUT_CORRECTIONS.get(name)(LEVELS[level](old, old, mask), mask, cap=2.0)
    assert torch.equal(weights, mask)  # 1 on every token, 0 off the mask
    assert torch.equal(loss * weights, loss)  # not one bit changed


def test_mismatch_metrics_match_loop():
    old, rollout, mask = make_batch(3)
    got = rollout_mismatch(old, rollout, mask, threshold=0.3)
    o, r, m = old.tolist(), rollout.tolist(), mask.tolist()
    valid = [(i, t) for i in range(B) for t in range(T) if m[i][t]]
    k3 = [math.exp(o[i][t] - r[i][t]) - (o[i][t] - r[i][t]) - 1 for i, t in valid]  # KL(pi_rollout || pi_old)
    diffs = [abs(o[i][t] - r[i][t]) for i, t in valid]
    assert abs(got["rollout_kl"].item() - sum(k3) / len(k3)) < 1e-12
    assert abs(got["rollout_logprob_diff_max"].item() - max(diffs)) < 1e-12
    assert abs(got["rollout_logprob_diff_frac"].item() - sum(d > 0.3 for d in diffs) / len(diffs)) < 1e-12
    zero = rollout_mismatch(old, old, mask, threshold=0.3)
    assert all(v.item() == 0.0 for v in zero.values())
