"""Value losses vs plain-Python loops."""

import pytest
import torch

from posttrain.algos import VALUE_LOSSES

B, T = 6, 7


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    return values, old, returns, mask


def run(name, values, old, returns, mask, **kw):
    v = values.clone().requires_grad_(True)
    loss, metrics = VALUE_LOSSES.get(name)(v, old, returns, mask, **kw)
    loss.sum().backward()
    return loss, v.grad, metrics


def check(got, expected):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_clipped_matches_loop(seed, eps):
    values, old, returns, mask = make_batch(seed)
    loss, grad, metrics = run("clipped", values, old, returns, mask, clip_eps=eps)
    v, o, r, m = values.tolist(), old.tolist(), returns.tolist(), mask.tolist()
    exp_loss = [[0.0] * T for _ in range(B)]
    exp_grad = [[0.0] * T for _ in range(B)]
    n = n_clip = 0
    for i in range(B):
        for t in range(T):
            if not m[i][t]:
                continue
            v_clip = min(max(v[i][t], o[i][t] - eps), o[i][t] + eps)
            sq, sq_clip = (v[i][t] - r[i][t]) ** 2, (v_clip - r[i][t]) ** 2
            exp_loss[i][t] = 0.5 * max(sq, sq_clip)
            inside = o[i][t] - eps < v[i][t] < o[i][t] + eps
            if sq >= sq_clip:
                exp_grad[i][t] = v[i][t] - r[i][t]
            else:  # the clipped branch: gradient only flows inside the band
                exp_grad[i][t] = (v_clip - r[i][t]) if inside else 0.0
            n, n_clip = n + 1, n_clip + (sq_clip > sq)
    check(loss, exp_loss)
    check(grad, exp_grad)
    assert abs(metrics["vf_clip_frac"].item() - n_clip / n) < 1e-6
    assert 0 < metrics["vf_clip_frac"].item() < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_unclipped_matches_loop(seed):
    values, old, returns, mask = make_batch(seed)
    loss, grad, metrics = run("unclipped", values, old, returns, mask)
    v, r, m = values.tolist(), returns.tolist(), mask.tolist()
    check(loss, [[0.5 * (v[i][t] - r[i][t]) ** 2 if m[i][t] else 0.0 for t in range(T)] for i in range(B)])
    check(grad, [[(v[i][t] - r[i][t]) if m[i][t] else 0.0 for t in range(T)] for i in range(B)])
    assert metrics["vf_clip_frac"].item() == 0.0


@pytest.mark.parametrize("name", VALUE_LOSSES.names())
def test_zero_length_sequences_give_no_nan(name):
    values, old, returns, mask = make_batch(0)
    for m in (mask, torch.zeros_like(mask)):
        loss, grad, metrics = run(name, values, old, returns.masked_fill(m == 0, float("nan")), m)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.isfinite(metrics["vf_clip_frac"])
