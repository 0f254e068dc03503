"""The prefill in passes of at most PREFILL_TOKENS prompt tokens (models/lean.py `row_chunks`): the same logits and
cache contents as one pass over every prompt, with distinct and shared prompts, and the same decoding after it."""

import pytest
import torch

import posttrain.models.lean as lean_module
from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model
from posttrain.models.chat import encode_prompts
from posttrain.models.lean import KVCache, LeanDecoder, lean_backbone, positions_from_mask, row_chunks

PROMPTS = {"distinct": ["1+2=", "37+58=", "x", "hello world", "9+9=", "a much longer prompt than the rest"],
           "shared": [p for p in ["1+2=", "hello world", "37+58="] for _ in range(3)]}


def test_row_chunks_hold_at_most_the_budget_and_cover_every_row_once():
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in (3, 2, 6, 1, 1, 4)])
    assert row_chunks(mask, None) == [slice(0, 6)]
    assert row_chunks(mask, 5) == [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 6)]  # a 6-token row alone
    assert row_chunks(mask, 100) == [slice(0, 6)]
    assert row_chunks(mask, 1) == [slice(i, i + 1) for i in range(6)]


def test_a_cache_view_of_rows_writes_into_the_cache():
    cache = KVCache(2, 4, 1, 5, 3, torch.float32)
    cache.k.zero_(), cache.v.zero_()
    view = cache.rows(slice(1, 3))
    k, v = torch.ones(2, 1, 2, 3), torch.full((2, 1, 2, 3), 2.0)
    view.append(1, k, v)
    assert cache.k[1, 1:3, :, :2].eq(1).all() and cache.v[1, 1:3, :, :2].eq(2).all()
    assert cache.k.sum() == k.numel() and cache.k[0].eq(0).all()  # nothing else written


@pytest.mark.parametrize("layout", PROMPTS)
def test_prefill_in_passes_equals_one_pass(tokenizer, layout, monkeypatch):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    lean = lean_backbone(build_tiny_model(cfg, tokenizer, seed=0).eval())
    ids, mask = encode_prompts(tokenizer, PROMPTS[layout])
    pos = positions_from_mask(mask)
    out = {}
    for budget in (None, 12):  # 12 tokens: passes of one to three prompts
        monkeypatch.setattr(lean_module, "PREFILL_TOKENS", budget)
        assert (len(row_chunks(mask, budget)) > 2) == (budget is not None)
        with torch.no_grad():
            dec = LeanDecoder(lean, mask, 6, share_prompts=layout == "shared")
            first = dec.prefill(ids, mask, pos)
            tokens = first.argmax(-1)
            steps = [dec.step(tokens, mask.sum(-1) + t) for t in range(3)]
        cache = dec.cache
        P = ids.size(1)
        kv = (cache.k[..., :P, :], cache.v[..., :P, :]) if type(cache) is KVCache else (cache.pk, cache.pv)
        out[budget] = (first, steps, kv, mask.bool())
    (a, sa, kva, m), (b, sb, kvb, _) = out[None], out[12]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    if layout == "distinct":  # the real prompt positions of the cache (padding positions hold whatever they hold)
        keep = m[None, :, None, :, None]
        for x, y in zip(kva, kvb):
            torch.testing.assert_close(x * keep, y * keep, atol=1e-5, rtol=0)


def test_passes_run_shortest_prompts_first_from_their_longest_prompts_first_token(tokenizer, monkeypatch):
    """The distinct prompts are prefilled shortest first, each pass only from the first column that is not padding
    in all of its rows: the passes' widths are their longest prompts' lengths (not the batch's), every prompt is in
    exactly one pass, and the skipped cache columns are zeros (masked keys, finite)."""
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    lean = lean_backbone(build_tiny_model(cfg, tokenizer, seed=0).eval())
    ids, mask = encode_prompts(tokenizer, PROMPTS["distinct"])
    widths, rows = [], []
    forward = type(lean).forward

    def spy(self, input_ids, *args, **kw):
        widths.append(input_ids.size(1))
        rows.append(input_ids.size(0))
        return forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(lean), "forward", spy)
    monkeypatch.setattr(lean_module, "PREFILL_TOKENS", 12)
    with torch.no_grad():
        dec = LeanDecoder(lean, mask, 2)
        dec.prefill(ids, mask, positions_from_mask(mask))
    lengths = sorted(mask.sum(1).tolist())
    assert sum(rows) == len(lengths) and widths == sorted(widths) and widths[-1] == ids.size(1)
    ends = [sum(rows[:i + 1]) for i in range(len(rows))]
    assert widths == [lengths[e - 1] for e in ends] and widths[0] < ids.size(1)  # each pass: its longest prompt
    pad = ~mask.bool()[None, :, None, :, None]
    assert dec.cache.k[..., :ids.size(1), :].masked_select(pad).eq(0).all()
