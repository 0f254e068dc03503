"""Generation: its log-probs equal the training forward pass (so the first PPO ratio is 1), the EOS mask,
greedy decoding, seeding, and the top-k / top-p filters."""

import math
import sys

import pytest
import torch

from posttrain.algos import POLICY_LOSSES
from posttrain.models.logprobs import response_logprobs
from posttrain.models.chat import encode_prompts
from posttrain.rollout.generate import filter_logits, generate

# Different lengths, so most rows are left-padded; the empty prompt is BOS alone.
PROMPTS = ["1+2=", "37+58=", "5=", "123*45=", "9-9=", "", "hello world\n", "x"]
MAX_NEW = 8


def with_eos_bias(model, eos_id: int, bias: float, sharpen: float = 30.0):
    """Give the untrained model a peaked next-token distribution (lm_head weights x `sharpen`) and a
    logit bias towards EOS, so rows stop at different steps (and ties in argmax are out of reach)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * sharpen)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model.eval()


@pytest.fixture
def model(tiny_model, tokenizer):
    return with_eos_bias(tiny_model, tokenizer.eos_token_id, bias=3.0)


@pytest.fixture
def prompts(tokenizer):
    return encode_prompts(tokenizer, PROMPTS)


def sample(model, tokenizer, prompts, seed=0, **kw):
    ids, mask = prompts
    kw.setdefault("max_new_tokens", MAX_NEW)
    return generate(model, ids, mask, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_generation_logprobs_equal_the_training_forward_pass(model, tokenizer, prompts, temperature, top_k, top_p):
    ids, mask = prompts
    assert (mask == 0).any(), "left padding must be exercised"
    out = sample(model, tokenizer, prompts, temperature=temperature, top_k=top_k, top_p=top_p)
    lengths = out.response_lengths.tolist()
    assert len(set(lengths)) >= 3, lengths  # rows of different response lengths
    assert out.finished.any() and not out.finished.all()

    logprobs, _ = response_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=temperature)
    torch.testing.assert_close(out.rollout_logprobs, logprobs, atol=1e-5, rtol=0)
    on = out.response_mask.bool()
    assert (out.rollout_logprobs[on] < 0).all()  # real log-probabilities, not placeholders
    assert (out.rollout_logprobs[~on] == 0).all()

    # Hence the first PPO ratio of an on-policy update is exactly 1 and nothing is clipped.
    adv = torch.randn(out.response_mask.shape, generator=torch.Generator().manual_seed(1))
    _, metrics = POLICY_LOSSES.get("ppo_clip")(logprobs, out.rollout_logprobs, adv, out.response_mask)
    assert abs(float(metrics["ratio_max"]) - 1.0) < 1e-5
    assert float(metrics["clip_frac"]) == 0.0


def test_logprobs_are_at_the_sampling_temperature(model, tokenizer, prompts):
    ids, mask = prompts
    out = sample(model, tokenizer, prompts, temperature=0.7)
    at_one, _ = response_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=1.0)
    assert (out.rollout_logprobs - at_one).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_mask_is_one_up_to_and_including_the_first_eos(model, tokenizer, prompts, seed):
    out = sample(model, tokenizer, prompts, seed=seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    T = out.response_ids.size(1)
    assert T <= MAX_NEW
    for ids, mask, finished in zip(out.response_ids.tolist(), out.response_mask.tolist(), out.finished.tolist()):
        if eos in ids:
            first = ids.index(eos)
            assert mask == [1.0] * (first + 1) + [0.0] * (T - first - 1)
            assert ids[first + 1:] == [pad] * (T - first - 1)
            assert finished
        else:
            assert mask == [1.0] * T
            assert T == MAX_NEW
            assert not finished
    assert out.finished.any() and not out.finished.all()


def test_generation_stops_when_every_row_has_ended(tiny_model, tokenizer, prompts):
    model = with_eos_bias(tiny_model, tokenizer.eos_token_id, bias=1e3)
    out = sample(model, tokenizer, prompts)
    assert out.response_ids.shape == (len(PROMPTS), 1)
    assert (out.response_ids == tokenizer.eos_token_id).all()
    assert out.finished.all() and (out.response_mask == 1).all()


def test_greedy_is_deterministic_and_equals_stepwise_argmax(model, tokenizer, prompts):
    ids, mask = prompts
    a = sample(model, tokenizer, prompts, seed=0, greedy=True)
    b = sample(model, tokenizer, prompts, seed=99, greedy=True)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.response_lengths.max() >= 4, a.response_lengths  # enough steps to be a real check
    eos = tokenizer.eos_token_id
    for row in range(len(PROMPTS)):
        # the same prompt alone, without padding or cache, one full forward pass per step
        seq = tokenizer(PROMPTS[row])["input_ids"]
        expected = []
        for _ in range(MAX_NEW):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            expected.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
        n = int(a.response_lengths[row])
        assert a.response_ids[row, :n].tolist() == expected


def test_same_generator_seed_gives_identical_samples(model, tokenizer, prompts):
    a = sample(model, tokenizer, prompts, seed=7)
    b = sample(model, tokenizer, prompts, seed=7)
    c = sample(model, tokenizer, prompts, seed=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p=1e-6"])
def test_single_token_filters_sample_the_greedy_answer(model, tokenizer, prompts, kw):
    greedy = sample(model, tokenizer, prompts, greedy=True)
    for seed in range(3):
        out = sample(model, tokenizer, prompts, seed=seed, temperature=1.0, **kw)
        assert torch.equal(out.response_ids, greedy.response_ids)
        assert torch.equal(out.response_mask, greedy.response_mask)


def top_p_keep_reference(row: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p, by a plain loop."""
    z = max(row)
    weights = [math.exp(x - z) for x in row]
    total = sum(weights)
    keep, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        keep.add(i)
        mass += weights[i] / total
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = torch.randn(16, 20, generator=torch.Generator().manual_seed(0)) * 2
    out = filter_logits(logits, top_p=p)
    for row_in, row_out in zip(logits.tolist(), out.tolist()):
        kept = {i for i, x in enumerate(row_out) if math.isfinite(x)}
        assert kept == top_p_keep_reference(row_in, p)
        assert all(row_out[i] == row_in[i] for i in kept)  # kept logits are untouched


def test_top_p_on_a_known_distribution():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(0.99) == [True, True, True, True]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    out = filter_logits(logits, top_k=3)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 3).all()
    top3 = torch.zeros_like(kept).scatter(-1, logits.topk(3, dim=-1).indices, True)
    assert torch.equal(kept, top3)
    assert torch.equal(out[kept], logits[kept])
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=20), logits)


@pytest.mark.parametrize("lean", ["1", "0"])
def test_finished_rows_leave_the_decode_batch_with_the_same_samples(model, tokenizer, prompts, lean, monkeypatch):
    """Rows that ended stop being computed (the stepper sees fewer rows), and the samples, masks and log-probs
    are those of decoding every row to the end: the random stream does not depend on when rows finish."""
    gen = sys.modules[generate.__module__]  # the module (posttrain.rollout exports the function under its name)
    monkeypatch.setenv("POSTTRAIN_LEAN", lean)
    sizes = []
    for cls in (gen._LeanStepper, gen._HFStepper):
        step = cls.step
        monkeypatch.setattr(cls, "step", lambda self, tok, *a, _step=step: sizes.append(len(tok)) or _step(self, tok, *a))
    ids, mask = prompts
    runs = []
    for below in (0.0, gen.COMPACT_BELOW):  # 0: never compacts
        monkeypatch.setattr(gen, "COMPACT_BELOW", below)
        sizes.clear()
        out = generate(model, ids, mask, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3))
        runs.append((out, list(sizes)))
    (full, full_sizes), (compact, compact_sizes) = runs
    lengths = full.response_mask.sum(1)
    assert lengths.min() < lengths.max() - 2  # rows do end at different steps
    assert set(full_sizes) == {len(PROMPTS)} and min(compact_sizes) < len(PROMPTS)
    assert sum(compact_sizes) < sum(full_sizes)
    # a step computes at most the live rows / COMPACT_BELOW
    live = [int(full.response_mask[:, t + 1].sum()) for t in range(len(full_sizes))]
    assert all(n <= max(1, math.ceil(a / gen.COMPACT_BELOW)) + 1 or n == len(PROMPTS) for n, a in zip(compact_sizes, live))
    assert torch.equal(compact.response_ids, full.response_ids)
    assert torch.equal(compact.response_mask, full.response_mask)
    torch.testing.assert_close(compact.rollout_logprobs, full.rollout_logprobs, atol=1e-5, rtol=0)


def test_sampled_tokens_follow_the_distribution_and_skip_zero_probability():
    """sample_tokens inverts each row's CDF: frequencies over 40,000 draws match the probabilities (within 4
    standard errors), a zero-probability token is never drawn, and a one-hot row always gives its token."""
    gen = sys.modules[generate.__module__]
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.1, 0.0, 0.0, 0.9]])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gen.sample_tokens(probs, g) for _ in range(n)])  # (n, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        se = (probs[row].double() * (1 - probs[row].double()) / n).sqrt()
        assert torch.all((freq - probs[row].double()).abs() <= 4 * se + 1e-12), (row, freq)
        assert torch.all(freq[probs[row] == 0] == 0)
    again = torch.stack([gen.sample_tokens(probs, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert torch.equal(again[0], again[1])  # same generator state, same draw


def test_sampling_from_logits_in_one_buffer_draws_as_softmax_and_returns_its_logprobs():
    """sample_with_logprobs (the decode loop's sampling: exp(z - m) and its CDF written into one reused buffer)
    draws what sample_tokens draws from softmax(z) with the same generator, token for token here (they differ
    only where a uniform falls within float rounding of a CDF step); its log-probs are log_softmax(z) at the drawn
    tokens, unfiltered also where top-k filters the draw; frequencies follow softmax(z); greedy takes the argmax."""
    gen = sys.modules[generate.__module__]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 3000, generator=g) * 3
    logits[:, 7] = float("-inf")  # a zero-probability token is never drawn
    buffer = torch.empty_like(logits)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        tok, logp = gen.sample_with_logprobs(logits, a, buffer=buffer)
        assert torch.equal(tok, gen.sample_tokens(logits.softmax(-1), b))
        torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-6)
        assert not (tok == 7).any()
    tok, logp = gen.sample_with_logprobs(logits, a, top_k=5, buffer=buffer)
    assert all(t in set(logits[r].topk(5).indices.tolist()) for r, t in enumerate(tok.tolist()))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0],
                               atol=1e-5, rtol=1e-6)
    tok, _ = gen.sample_with_logprobs(logits, greedy=True)
    assert torch.equal(tok, logits.argmax(-1))
    small = torch.tensor([[0.0, 1.0, -1.0, 0.5]]).repeat(20_000, 1)
    draws = gen.sample_with_logprobs(small, torch.Generator().manual_seed(0))[0]
    p = small[0].softmax(-1).double()
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(draws)).sqrt())
