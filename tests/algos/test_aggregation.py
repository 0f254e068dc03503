"""aggregate vs plain-Python loops; micro-batch (gradient accumulation) invariance."""

import pytest
import torch

from posttrain.algos import AGG_MODES, aggregate

B, T, NORM = 9, 6, 8.0


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    return x, mask


def loop_aggregate(loss, mask, mode):
    seq_terms = []
    total, n_tokens = 0.0, 0
    for i in range(len(loss)):
        vals = [loss[i][t] for t in range(len(loss[i])) if mask[i][t]]
        total += sum(vals)
        n_tokens += len(vals)
        if vals:
            if mode == "seq-mean-token-mean":
                seq_terms.append(sum(vals) / len(vals))
            elif mode == "seq-mean-token-sum":
                seq_terms.append(sum(vals))
            else:
                seq_terms.append(sum(vals) / NORM)
    if mode == "token-mean":
        return total / max(n_tokens, 1)
    return sum(seq_terms) / max(len(seq_terms), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_loop(seed, mode):
    x, mask = make_batch(seed)
    got = aggregate(x, mask, mode, norm_constant=NORM)
    assert got.dim() == 0
    assert abs(got.item() - loop_aggregate(x.tolist(), mask.tolist(), mode)) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("splits", [[4, 5], [2, 3, 4], [1, 1, 7]])
def test_micro_batch_gradients_sum_to_full_batch_gradient(seed, mode, splits):
    x, mask = make_batch(seed)
    w = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))

    def per_token(p, idx=slice(None)):  # a non-linear per-token loss of a "parameter"
        return torch.sin(p[idx]) * w[idx] + p[idx] ** 2

    p_full = x.clone().requires_grad_(True)
    aggregate(per_token(p_full), mask, mode, norm_constant=NORM).backward()

    n_tok = mask.sum()
    n_seq = (mask.sum(-1) > 0).sum()
    p = x.clone().requires_grad_(True)
    total = 0.0
    for idx in torch.split(torch.arange(B), splits):
        micro = aggregate(per_token(p, idx), mask[idx], mode, global_num_tokens=n_tok,
                          global_num_seqs=n_seq, norm_constant=NORM)
        micro.backward()
        total += micro.item()
    torch.testing.assert_close(p.grad, p_full.grad, atol=1e-6, rtol=0)
    full = aggregate(per_token(x), mask, mode, norm_constant=NORM).item()
    assert abs(total - full) < 1e-6


@pytest.mark.parametrize("mode", AGG_MODES)
def test_zero_length_sequences_give_no_nan(mode):
    x, mask = make_batch(0)
    for m in (mask, torch.zeros_like(mask)):
        p = x.clone().requires_grad_(True)
        out = aggregate(p * 2, m, mode, norm_constant=NORM)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(p.grad).all()
        assert (p.grad[m == 0] == 0).all()
    assert aggregate(x, torch.zeros_like(mask), mode, norm_constant=NORM).item() == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_padding_garbage_and_bool_mask(mode):
    x, mask = make_batch(1)
    garbage = x.masked_fill(mask == 0, float("inf"))
    a = aggregate(x, mask, mode, norm_constant=NORM)
    b = aggregate(garbage, mask.bool(), mode, norm_constant=NORM)
    torch.testing.assert_close(a, b)


def test_unknown_mode_lists_valid_modes():
    x, mask = make_batch(0)
    with pytest.raises(ValueError) as err:
        aggregate(x, mask, "token_mean")
    assert "token_mean" in str(err.value)
    assert all(m in str(err.value) for m in AGG_MODES)


def test_norm_mode_requires_norm_constant():
    x, mask = make_batch(0)
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(x, mask, "seq-mean-token-sum-norm")
