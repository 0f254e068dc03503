"""Speculative sampling (posttrain/rollout/speculative.py): the accept/reject rule and the prompt-lookup draft
against plain loops; exactness in distribution (chi-square against the exact sequence probabilities, on a
hand-made trigram policy and on a tiny Llama, and the same test failing for wrong rules); log-probs equal to the
training forward pass; greedy equal to generate(); stop ids and max_new_tokens; determinism; the engine switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError
from posttrain.models import build_tiny_model
from posttrain.models.chat import encode_prompts
from posttrain.models.lean import lean_backbone
from posttrain.models.logprobs import response_logprobs
from posttrain.rollout import generate
from posttrain.rollout.engines import TorchEngine
from posttrain.rollout.generate import filter_logits
from posttrain.rollout.speculative import (
    _LeanVerifier,
    accept_draft,
    budget,
    ngram_draft,
    speculate,
    speculative_generate,
)


def chi2_pvalue(observed: dict, expected: dict, n: int) -> float:
    """Pearson's chi-square goodness of fit of counts `observed` to probabilities `expected` (n draws); bins with
    an expected count under 5 are pooled. P(chi2_df >= x) = Q(df/2, x/2), the regularised upper gamma."""
    bins, pooled_o, pooled_e = [], 0.0, 0.0
    for key, prob in expected.items():
        if n * prob >= 5:
            bins.append((observed.get(key, 0), n * prob))
        else:
            pooled_o, pooled_e = pooled_o + observed.get(key, 0), pooled_e + n * prob
    pooled_o += sum(c for key, c in observed.items() if key not in expected)  # impossible outcomes
    if pooled_e > 0 or pooled_o > 0:
        bins.append((pooled_o, max(pooled_e, 1e-12)))
    x = sum((o - e) ** 2 / e for o, e in bins)
    df = len(bins) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


def counts(batch) -> dict:
    out: dict = {}
    for ids, m in zip(batch.response_ids.tolist(), batch.response_mask.tolist()):
        key = tuple(t for t, keep in zip(ids, m) if keep)
        out[key] = out.get(key, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------- the pure rule


def test_accept_draft_equals_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    R, L, V = 64, 4, 6
    p = torch.rand(R, L, V, generator=g).pow(3).softmax(-1)
    q = torch.rand(R, L - 1, V, generator=g).softmax(-1)
    draft = torch.randint(V, (R, L - 1), generator=g)
    m = torch.randint(L, (R,), generator=g)
    u = torch.rand(R, L - 1, generator=g)
    for qq in (None, q):
        a, dist = accept_draft(p, draft, m, u, qq)
        for r in range(R):
            n = 0
            while n < m[r]:
                d = int(draft[r, n])
                ratio = p[r, n, d] / (1.0 if qq is None else qq[r, n, d])
                if not u[r, n] < ratio:
                    break
                n += 1
            assert int(a[r]) == n
            if n < m[r]:
                want = p[r, n].clone()
                if qq is None:
                    want[int(draft[r, n])] = 0
                else:
                    want = (want - qq[r, n]).clamp(min=0)
            else:
                want = p[r, n]
            torch.testing.assert_close(dist[r], want)


def first_token_distribution(p0, q0, n, seed, rule):
    """One verify position: draft d ~ q0 (one-hot if q0 is None: d = argmax q... here a fixed token), then the
    token emitted first. -> counts of that token over n rows."""
    g = torch.Generator().manual_seed(seed)
    V = p0.numel()
    p = torch.stack([p0, torch.full((V,), 1.0 / V)]).expand(n, 2, V)
    if q0 is None:
        draft = torch.full((n, 1), 2, dtype=torch.long)
        q = None
    else:
        draft = torch.multinomial(q0, n, replacement=True, generator=g).unsqueeze(1)
        q = q0.expand(n, 1, V)
    u = torch.rand(n, 1, generator=g)
    a, dist = rule(p, draft, torch.ones(n, dtype=torch.long), u, q)
    nxt = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1, generator=g).squeeze(1)
    first = torch.where(a > 0, draft[:, 0], nxt)
    return {(int(t),): int((first == t).sum()) for t in range(V)}


def always_accept(p, draft, m, u, q=None):
    a, dist = accept_draft(p, draft, m, torch.zeros_like(u), q)  # u = 0 < any ratio > 0
    return a, dist


def resample_from_p(p, draft, m, u, q=None):
    a, _ = accept_draft(p, draft, m, u, q)
    return a, p[torch.arange(len(a)), a]  # the residual replaced by p: d is over-produced


@pytest.mark.parametrize("draft_kind", ["deterministic", "draft-model"])
def test_the_rule_reproduces_the_target_and_wrong_rules_fail(draft_kind):
    p0 = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    q0 = None if draft_kind == "deterministic" else torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    n = 20000
    expected = {(t,): float(p0[t]) for t in range(5)}
    assert chi2_pvalue(first_token_distribution(p0, q0, n, 0, accept_draft), expected, n) > 1e-3
    for wrong in (always_accept, resample_from_p):
        assert chi2_pvalue(first_token_distribution(p0, q0, n, 0, wrong), expected, n) < 1e-6


def test_ngram_draft_equals_a_plain_loop():
    g = torch.Generator().manual_seed(1)
    R, W, n, k = 200, 14, 2, 3
    ctx = torch.randint(3, (R, W), generator=g)
    start = torch.randint(0, 4, (R,), generator=g)
    end = torch.randint(5, W + 1, (R,), generator=g)
    draft, m = ngram_draft(ctx, start, end, n, k)
    for r in range(R):
        row = ctx[r, start[r]:end[r]].tolist()
        want: list = []
        for s in range(len(row) - n - 1, -1, -1):  # the latest earlier occurrence of the last n tokens
            if row[s:s + n] == row[-n:]:
                want = row[s + n:s + n + k]
                break
        assert int(m[r]) == len(want) and draft[r, :len(want)].tolist() == want
    assert int(m.sum()) > 0 and int((m == 0).sum()) > 0  # both cases occurred


def test_budget_keeps_draft_tokens_breadth_first():
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        m = torch.randint(0, 5, (7,), generator=g)
        total = int(torch.randint(0, 20, (1,), generator=g))
        order = [(j, r) for j in range(5) for r in range(7) if j < m[r]]  # breadth first, rows in order
        want = [sum(1 for j, rr in order[:total] if rr == r) for r in range(7)]
        assert budget(m, total).tolist() == want


# ----------------------------------------------------------------- exactness of whole sequences, hand-made policy

V_HAND, EOS = 5, 4


class TrigramPolicy:
    """A hand-made verifier: logits of the next token = table[previous two tokens]; the table favours repeating
    the token two back, so prompt-lookup drafts are often right and often wrong."""

    def __init__(self, prompt, B, capacity, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V_HAND, V_HAND, V_HAND, generator=g) * 1.5
        for a in range(V_HAND):
            self.table[a, :, a] += 3.0
        self.ctx = torch.tensor(prompt).repeat(B, 1)
        self.ctx = torch.cat([self.ctx, torch.zeros(B, capacity, dtype=torch.long)], 1)
        self.P = len(prompt)
        self.first = self.table[self.ctx[:, self.P - 2], self.ctx[:, self.P - 1]]

    def keep(self, rows):
        self.ctx = self.ctx[rows]

    def verify(self, tokens, fed, used):
        L = tokens.size(1)
        slots = self.P + fed.unsqueeze(1) + torch.arange(L)
        self.ctx.scatter_(1, slots, tokens)
        return self.table[self.ctx.gather(1, slots - 1), self.ctx.gather(1, slots)]  # (R, L, V)

    def exact(self, prompt, N, T, top_k):
        """{response: probability} of every response under non-speculative sampling."""
        out = {}

        def walk(prev, seq, prob):
            if len(seq) == N or (seq and seq[-1] == EOS):
                out[tuple(seq)] = prob
                return
            p = filter_logits(self.table[prev[-2], prev[-1]].unsqueeze(0) / T, top_k).softmax(-1)[0]
            for t in range(V_HAND):
                if p[t] > 0:
                    walk(prev + [t], seq + [t], prob * float(p[t]))

        walk(list(prompt), [], 1.0)
        return out


def sample_hand(prompt, n, N, k, ngram, T, top_k, seed, accept=accept_draft, stats=None, draft_budget=1.0):
    policy = TrigramPolicy(prompt, n, N + k + 1)
    ids = torch.tensor(prompt).repeat(n, 1)
    batch = speculate(policy, ids, torch.ones_like(ids), max_new_tokens=N, eos_token_id=EOS, pad_token_id=0,
                      temperature=T, top_k=top_k, generator=torch.Generator().manual_seed(seed), draft_tokens=k,
                      ngram=ngram, stats=stats, accept=accept, draft_budget=draft_budget)
    return policy, batch


@pytest.mark.parametrize("T,top_k,draft_budget", [(1.0, 0, 1.0), (0.8, 3, 1.0), (1.0, 0, 8.0)])
def test_sequences_are_distributed_as_the_policy(T, top_k, draft_budget):
    prompt, n, N = [0, 1, 0, 1, 2, 0, 1], 30000, 5
    stats: dict = {}
    policy, batch = sample_hand(prompt, n, N, k=3, ngram=1, T=T, top_k=top_k, seed=0, stats=stats,
                                draft_budget=draft_budget)
    expected = policy.exact(prompt, N, T, top_k)
    assert abs(sum(expected.values()) - 1) < 1e-6
    assert 0.2 < stats["accepted"] / stats["drafted"] < 0.8  # drafts were often right and often wrong
    assert chi2_pvalue(counts(batch), expected, n) > 1e-3
    for wrong in (always_accept, resample_from_p):
        _, bad = sample_hand(prompt, n, N, k=3, ngram=1, T=T, top_k=top_k, seed=0, accept=wrong,
                             draft_budget=draft_budget)
        assert chi2_pvalue(counts(bad), expected, n) < 1e-6


def test_stop_ids_and_max_new_tokens_are_exact():
    prompt, n, N = [0, 1, 0, 1, 2, 0, 1], 3000, 6
    _, batch = sample_hand(prompt, n, N, k=4, ngram=1, T=1.0, top_k=0, seed=3)
    ids, mask = batch.response_ids, batch.response_mask.bool()
    lengths = mask.sum(-1)
    assert ids.size(1) == N and int(lengths.max()) == N
    for row, m, fin, length in zip(ids.tolist(), mask.tolist(), batch.finished.tolist(), lengths.tolist()):
        assert m == [True] * length + [False] * (N - length)  # a prefix, padding after it
        body = row[:length]
        assert EOS not in body[:-1]  # nothing is emitted after a stop id
        assert fin == (body[-1] == EOS)  # finished iff it ended at EOS, else it ran to max_new_tokens
        assert fin or length == N
        assert all(t == 0 for t in row[length:])
    assert 0 < int(batch.finished.sum()) < n


# ------------------------------------------------------------------------------------------- a tiny Llama

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture
def llama(tokenizer):
    return build_tiny_model(TINY, tokenizer, seed=0).eval()


def exact_model_distribution(model, prompt_ids, N, eos, top_k):
    """{response: probability} under non-speculative top-k sampling, by walking the tree with full forwards."""
    out = {}

    @torch.no_grad()
    def walk(seq, prob):
        if len(seq) == N or (seq and seq[-1] == eos):
            out[tuple(seq)] = prob
            return
        logits = model(input_ids=torch.tensor([prompt_ids + seq])).logits[0, -1:]
        p = filter_logits(logits.float(), top_k).softmax(-1)[0]
        for t in p.nonzero().squeeze(1).tolist():
            walk(seq + [t], prob * float(p[t]))

    walk([], 1.0)
    return out


def test_tiny_llama_samples_are_distributed_as_generate(llama, tokenizer):
    n, N = 4000, 4
    ids, mask = encode_prompts(tokenizer, ["aaaaaaaa"] * n)
    expected = exact_model_distribution(llama, ids[0].tolist(), N, tokenizer.eos_token_id, top_k=2)
    stats: dict = {}
    spec = speculative_generate(llama, ids, mask, max_new_tokens=N, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, top_k=2, generator=torch.Generator().manual_seed(0),
                                draft_tokens=3, ngram=1, stats=stats)
    assert stats["accepted"] > 0.2 * stats["drafted"] > 0
    assert chi2_pvalue(counts(spec), expected, n) > 1e-3
    lean = _LeanVerifier(lean_backbone(llama), ids, mask, N, 3)
    wrong = speculate(lean, ids, mask, max_new_tokens=N, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, top_k=2, generator=torch.Generator().manual_seed(0),
                      draft_tokens=3, ngram=1, accept=resample_from_p)
    assert chi2_pvalue(counts(wrong), expected, n) < 1e-6  # the test has the power to see a wrong rule
    plain = generate(llama, ids, mask, max_new_tokens=N, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, top_k=2, generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(counts(plain), expected, n) > 1e-3  # the reference sampler passes the same test


PROMPTS = ["abcabcabcabc", "1+2=3 1+2=", "xyxyxyxyxy", "hello hello hello", "7"]


@pytest.mark.parametrize("ngram,k", [(1, 4), (2, 2), (3, 6)])
def test_greedy_gives_exactly_the_greedy_tokens(llama, tokenizer, ngram, k):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    kw = {"max_new_tokens": 16, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "greedy": True}
    stats: dict = {}
    spec = speculative_generate(llama, ids, mask, draft_tokens=k, ngram=ngram, stats=stats, **kw)
    ref = generate(llama, ids, mask, **kw)
    assert stats["accepted"] > 0  # drafts were used
    assert torch.equal(spec.response_ids, ref.response_ids)
    assert torch.equal(spec.response_mask, ref.response_mask) and torch.equal(spec.finished, ref.finished)
    torch.testing.assert_close(spec.rollout_logprobs, ref.rollout_logprobs, atol=1e-5, rtol=0)


def test_logprobs_equal_the_training_forward_pass(llama, tokenizer):
    ids, mask = encode_prompts(tokenizer, [p for p in PROMPTS for _ in range(3)])
    stats: dict = {}
    out = speculative_generate(llama, ids, mask, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, temperature=0.7, top_k=4,
                               generator=torch.Generator().manual_seed(0), draft_tokens=3, ngram=1, stats=stats)
    assert stats["accepted"] > 0
    with torch.no_grad():
        lp, _ = response_logprobs(llama, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask,
                                  temperature=0.7)
    torch.testing.assert_close(out.rollout_logprobs, lp, atol=1e-5, rtol=0)
    assert float(out.rollout_logprobs.abs().sum()) > 0


def test_same_seed_same_batch_and_the_engine_switch(llama, tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    kw = {"max_new_tokens": 10, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    engine = TorchEngine(llama, speculative="ngram", speculative_tokens=3, speculative_ngram=1)
    a = engine.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    b = speculative_generate(llama, ids, mask, generator=torch.Generator().manual_seed(5), draft_tokens=3, ngram=1,
                             **kw)
    for field in ("response_ids", "response_mask", "rollout_logprobs", "finished"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    plain = TorchEngine(llama).generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    ref = generate(llama, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(plain.response_ids, ref.response_ids)


def test_one_token_and_left_padding(llama, tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    assert int((mask == 0).sum()) > 0  # left padding present
    out = speculative_generate(llama, ids, mask, max_new_tokens=1, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, greedy=True)
    ref = generate(llama, ids, mask, max_new_tokens=1, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, greedy=True)
    assert torch.equal(out.response_ids, ref.response_ids) and out.response_ids.shape == (len(PROMPTS), 1)
    logits = llama(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].detach()
    torch.testing.assert_close(out.rollout_logprobs[:, 0], F.log_softmax(logits, -1).gather(
        -1, out.response_ids).squeeze(1), atol=1e-5, rtol=0)
    assert not math.isnan(float(out.rollout_logprobs.sum()))


def test_config_keys_validate_and_name_the_key(make_config, tmp_path):
    cfg = make_config(tmp_path, "rl.speculative=ngram", "rl.speculative_tokens=5", "rl.speculative_ngram=2")
    assert (cfg.rl.speculative, cfg.rl.speculative_tokens, cfg.rl.speculative_ngram) == ("ngram", 5, 2)
    assert make_config(tmp_path).rl.speculative == "none"
    for bad, key in (("rl.speculative=medusa", "rl.speculative"), ("rl.speculative_tokens=0", "rl.speculative_tokens")):
        with pytest.raises(ConfigError, match=key):
            make_config(tmp_path, bad)


def test_a_model_the_lean_forward_does_not_cover_decodes_with_generate(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      pad_token_id=tokenizer.pad_token_id)).eval()
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    kw = {"max_new_tokens": 6, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    out = speculative_generate(gpt2, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    ref = generate(gpt2, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out.response_ids, ref.response_ids)


def test_a_grpo_step_with_speculative_rollouts_has_ratio_one(tmp_path, make_config, tiny_model, tokenizer,
                                                             monkeypatch):
    import posttrain.rollout.speculative as spec
    from posttrain.rl.loop import RLRun
    from tests.recipes.test_rl import EvenFirstCharTask, snapshot

    calls = []
    monkeypatch.setattr(spec, "speculate", lambda *a, **kw: calls.append(1) or speculate(*a, **kw))
    cfg = make_config(tmp_path, "rl.speculative=ngram", "rl.speculative_ngram=1", "rl.max_new_tokens=8")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    before = snapshot(tiny_model)
    metrics = state.step()
    assert math.isfinite(metrics["loss"]) and metrics["first_log_ratio_max"] < 1e-4
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    assert calls  # the rollouts went through speculative sampling
