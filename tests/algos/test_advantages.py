"""Advantage estimators vs plain-Python loops of their equations."""

import math

import pytest
import torch

from posttrain.algos import ADVANTAGES

B, T = 8, 7
GROUP_IDS = [5, 5, 5, 9, 9, 9, 9, 100]  # sizes 3, 4 and a singleton


def make_batch(seed, holes=False):
    """Random float64 rewards/values; left-aligned masks of varying length (one full, one empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    if holes:  # masked positions inside responses (e.g. tool output)
        mask = mask * (torch.rand(B, T, generator=g, dtype=torch.float64) > 0.3)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    perm = torch.randperm(B, generator=g)
    group_ids = torch.tensor(GROUP_IDS)[perm]
    baseline = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, mask, values, group_ids, baseline


def seq_scores(rewards, mask):
    return [sum(rewards[i][t] for t in range(T) if mask[i][t]) for i in range(B)]


def groups(group_ids):
    out = {}
    for i, gid in enumerate(group_ids):
        out.setdefault(gid, []).append(i)
    return out


def broadcast(seq_adv, mask):
    return [[seq_adv[i] if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]


def check(got, expected):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_loop(seed, gamma, lam, holes):
    rewards, mask, values, *_ = make_batch(seed, holes)
    adv, ret = ADVANTAGES.get("gae")(rewards, mask, values=values, gamma=gamma, lam=lam)
    r, m, v = rewards.tolist(), mask.tolist(), values.tolist()
    exp_adv = [[0.0] * T for _ in range(B)]
    exp_ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        steps = [t for t in range(T) if m[i][t]]  # response tokens, in order
        a_next = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            v_next = v[i][steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = r[i][t] + gamma * v_next - v[i][t]
            a_next = delta + gamma * lam * a_next
            exp_adv[i][t] = a_next
            exp_ret[i][t] = a_next + v[i][t]
    check(adv, exp_adv)
    check(ret, exp_ret)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)])
def test_public_gae_equals_brute_force_sum(seed, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} over the ragged (left-aligned) response, by brute force."""
    from posttrain.algos.advantages import gae

    rewards, mask, values, *_ = make_batch(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.shape == ret.shape == (B, T)
    r, m, v = rewards.tolist(), mask.tolist(), values.tolist()
    exp_adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = int(sum(m[i]))
        delta = [r[i][t] + gamma * (v[i][t + 1] if t + 1 < n else 0.0) - v[i][t] for t in range(n)]
        for t in range(n):
            exp_adv[i][t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    check(adv, exp_adv)
    check(ret, [[exp_adv[i][t] + v[i][t] if m[i][t] else 0.0 for t in range(T)] for i in range(B)])


def test_gae_ignores_padding_contents():
    rewards, mask, values, *_ = make_batch(0)
    adv, ret = ADVANTAGES.get("gae")(rewards, mask, values=values)
    pad = mask == 0
    adv2, ret2 = ADVANTAGES.get("gae")(rewards.masked_fill(pad, float("nan")), mask,
                                       values=values.masked_fill(pad, 1e9))
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_matches_loop(seed):
    rewards, mask, _, group_ids, _ = make_batch(seed)
    eps = 1e-6
    adv, ret = ADVANTAGES.get("grpo")(rewards, mask, group_ids=group_ids, eps=eps)
    s = seq_scores(rewards.tolist(), mask.tolist())
    seq_adv = [0.0] * B
    for members in groups(group_ids.tolist()).values():
        n = len(members)
        mean = sum(s[j] for j in members) / n if n > 1 else 0.0
        std = math.sqrt(sum((s[j] - mean) ** 2 for j in members) / (n - 1)) if n > 1 else 1.0
        for i in members:
            seq_adv[i] = (s[i] - mean) / (std + eps)
    check(adv, broadcast(seq_adv, mask.tolist()))
    check(ret, broadcast(seq_adv, mask.tolist()))


def test_grpo_uses_unbiased_torch_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    rewards = torch.zeros(5, 3, dtype=torch.float64)
    rewards[:, 0] = r
    adv, _ = ADVANTAGES.get("grpo")(rewards, torch.ones(5, 3), group_ids=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(adv[:, 0], (r - r.mean()) / (r.std() + 1e-6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dr_grpo_matches_loop(seed):
    rewards, mask, _, group_ids, _ = make_batch(seed)
    adv, _ = ADVANTAGES.get("dr_grpo")(rewards, mask, group_ids=group_ids)
    s = seq_scores(rewards.tolist(), mask.tolist())
    seq_adv = [0.0] * B
    for members in groups(group_ids.tolist()).values():
        mean = sum(s[j] for j in members) / len(members) if len(members) > 1 else 0.0
        for i in members:
            seq_adv[i] = s[i] - mean
    check(adv, broadcast(seq_adv, mask.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_loop(seed):
    rewards, mask, _, group_ids, _ = make_batch(seed)
    adv, _ = ADVANTAGES.get("rloo")(rewards, mask, group_ids=group_ids)
    s = seq_scores(rewards.tolist(), mask.tolist())
    seq_adv = [0.0] * B
    for members in groups(group_ids.tolist()).values():
        for i in members:
            others = [s[j] for j in members if j != i]
            seq_adv[i] = s[i] - (sum(others) / len(others) if others else 0.0)
    check(adv, broadcast(seq_adv, mask.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("filtered", [False, True])
def test_reinforce_pp_matches_loop(seed, name, gamma, holes, filtered):
    """`scores` (the outcome scores, apart from the token rewards) give the baseline; the whitening statistics
    are those of `loss_mask` (filtered: rows 2 and 5 left out of the loss, as DAPO's overlong filter does)."""
    rewards, mask, _, group_ids, _ = make_batch(seed, holes)
    scores = torch.randn(B, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    loss_mask = mask.clone()
    if filtered:
        loss_mask[[2, 5]] = 0
    eps = 1e-6
    adv, ret = ADVANTAGES.get(name)(rewards, mask, group_ids=group_ids, scores=scores, gamma=gamma, eps=eps,
                                    loss_mask=loss_mask if filtered else None)
    r, m, lm = rewards.tolist(), mask.tolist(), loss_mask.tolist()
    a = [[0.0] * T for _ in range(B)]
    for i in range(B):  # return-to-go over the valid tokens only: G_t = sum_{s >= t} gamma^(#valid between) r_s
        valid = [t for t in range(T) if m[i][t]]
        for k, t in enumerate(valid):
            a[i][t] = sum(gamma ** (j - k) * r[i][valid[j]] for j in range(k, len(valid)))
    if name == "reinforce_pp_baseline":
        for members in groups(group_ids.tolist()).values():
            mean = sum(scores[j].item() for j in members) / len(members) if len(members) > 1 else 0.0
            for i in members:
                a[i] = [x - mean for x in a[i]]
    tokens = [a[i][t] for i in range(B) for t in range(T) if lm[i][t]]  # token-level statistics of the loss mask
    mu = sum(tokens) / len(tokens)
    var = sum((x - mu) ** 2 for x in tokens) / len(tokens)
    expected = [[(a[i][t] - mu) / math.sqrt(var + eps) if lm[i][t] else 0.0 for t in range(T)] for i in range(B)]
    check(adv, expected)
    check(ret, expected)


def test_reinforce_pp_with_outcome_rewards_is_the_whitened_sequence_reward():
    rewards, mask, *_ = make_batch(3)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    outcome = torch.zeros_like(rewards)
    outcome[torch.arange(B), last] = rewards[:, 0]
    outcome = outcome * mask
    adv, _ = ADVANTAGES.get("reinforce_pp")(outcome, mask)
    for i in range(B):  # one advantage per sequence
        valid = adv[i][mask[i] > 0]
        assert len(valid) > 0 or i == 1  # row 1 is empty
        assert len(valid) == 0 or torch.allclose(valid, valid[0].expand_as(valid))


def test_get_and_requires():
    assert ADVANTAGES.requires("gae") == {"values"}
    assert ADVANTAGES.requires("remax") == {"baseline_rewards"}
    assert ADVANTAGES.requires("reinforce_pp") == set()
    with pytest.raises(KeyError, match="did you mean 'rloo'"):
        ADVANTAGES.get("rlo")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remax_matches_loop(seed):
    rewards, mask, _, _, baseline = make_batch(seed)
    adv, ret = ADVANTAGES.get("remax")(rewards, mask, baseline_rewards=baseline)
    s = seq_scores(rewards.tolist(), mask.tolist())
    expected = broadcast([s[i] - baseline[i].item() for i in range(B)], mask.tolist())
    check(adv, expected)
    check(ret, expected)


@pytest.mark.parametrize("name,arg", [("gae", "values"), ("grpo", "group_ids"), ("dr_grpo", "group_ids"),
                                      ("rloo", "group_ids"), ("remax", "baseline_rewards"),
                                      ("reinforce_pp_baseline", "group_ids"), ("reinforce_pp_baseline", "scores")])
def test_missing_required_input_names_estimator_and_argument(name, arg):
    rewards, mask, _, group_ids, _ = make_batch(0)
    given = {"group_ids": group_ids} if arg == "scores" else {}
    with pytest.raises(ValueError, match=rf"{name}.*{arg}"):
        ADVANTAGES.get(name)(rewards, mask, **given)


def all_inputs(seed=0):
    rewards, mask, values, group_ids, baseline = make_batch(seed)
    return rewards, mask, dict(values=values, group_ids=group_ids, baseline_rewards=baseline, scores=baseline + 1)


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_zero_length_sequences_give_no_nan_and_zero_outside_mask(name):
    rewards, mask, kw = all_inputs()
    for m in (mask, torch.zeros_like(mask)):  # one empty row; then an entirely empty batch
        adv, ret = ADVANTAGES.get(name)(rewards, m, **kw)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_bool_mask_equals_float_mask_and_no_grad(name):
    rewards, mask, kw = all_inputs()
    rewards.requires_grad_(True)
    kw["values"].requires_grad_(True)
    adv_f, ret_f = ADVANTAGES.get(name)(rewards, mask, **kw)
    adv_b, ret_b = ADVANTAGES.get(name)(rewards, mask.bool(), **kw)
    torch.testing.assert_close(adv_f, adv_b)
    torch.testing.assert_close(ret_f, ret_b)
    assert not adv_f.requires_grad and not ret_f.requires_grad
