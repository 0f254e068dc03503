"""Decoding against one copy of each distinct prompt's keys and values (models/shared_kv.py): the same logits as
the cache that copies them to every row, at every step, while rows leave the batch, for groups of any size and
order; and generate() gives the same tokens with it as without."""

import importlib

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model
from posttrain.models.chat import encode_prompts
from posttrain.models.lean import KVCache, LeanDecoder, lean_backbone, positions_from_mask
from posttrain.models.shared_kv import SharedPromptKV
from posttrain.rollout import generate

generate_module = importlib.import_module("posttrain.rollout.generate")  # the module, not the function


def model(tokenizer, kv_heads):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).eval()


# GRPO's layout (groups in order, equal sizes) and another: groups of 3, 2 and 1, interleaved
LAYOUTS = {"grpo": ["1+2=", "1+2=", "37+58=", "37+58=", "hello", "hello"],
           "ragged": ["1+2=", "x", "1+2=", "hello world", "x", "1+2="],
           "one": ["1+2="] * 6}  # a single prompt (U = 1: its transposes move size-1 dimensions)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_prompt_cache_gives_the_copied_caches_logits_while_rows_leave(tokenizer, kv_heads, layout):
    prompts = LAYOUTS[layout]
    lean = lean_backbone(model(tokenizer, kv_heads))
    ids, mask = encode_prompts(tokenizer, prompts)
    pos = positions_from_mask(mask)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shared, copied = (LeanDecoder(lean, mask, 12, share_prompts=s) for s in (True, False))
        a, b = shared.prefill(ids, mask, pos), copied.prefill(ids, mask, pos)
        assert type(shared.cache) is SharedPromptKV and type(copied.cache) is KVCache
        assert shared.cache.pk.size(1) == len(set(prompts))  # one copy per distinct prompt
        assert shared.cache.identity == (layout != "ragged")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        rows = torch.arange(len(prompts))
        for t in range(10):
            if t == 3:
                rows = rows[[0, 2, 3, 5]]  # finished rows leave: the rest are gathered into their slots
                shared.keep(torch.tensor([0, 2, 3, 5]))
                copied.keep(torch.tensor([0, 2, 3, 5]))
                assert not shared.cache.identity
            if t == 6:
                rows = rows[[1, 2]]
                shared.keep(torch.tensor([1, 2]))
                copied.keep(torch.tensor([1, 2]))
            tokens = torch.randint(3, len(tokenizer), (len(rows),), generator=g)
            step_pos = mask.sum(-1)[rows] + t
            a, b = shared.step(tokens, step_pos), copied.step(tokens, step_pos)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {t}")


def test_generate_with_shared_prompts_equals_the_copied_cache(tokenizer, monkeypatch):
    """End to end, rows stopping at different steps: the same tokens, masks and log-probs."""
    m = model(tokenizer, 2)
    prompts = [p for p in ["1+2=", "37+58=", "x", "hello world"] for _ in range(4)]
    ids, mask = encode_prompts(tokenizer, prompts)
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789"))]  # rows end early
    runs = []
    for share in (True, False):
        monkeypatch.setattr(generate_module, "SHARE_PROMPTS", share)
        runs.append(generate(m, ids, mask, max_new_tokens=24, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3)))
    shared, copied = runs
    lengths = copied.response_mask.sum(1)
    assert lengths.min() < lengths.max() - 2  # rows end at different steps
    assert torch.equal(shared.response_ids, copied.response_ids)
    assert torch.equal(shared.response_mask, copied.response_mask)
    torch.testing.assert_close(shared.rollout_logprobs, copied.rollout_logprobs, atol=1e-6, rtol=0)


def test_more_than_one_position_per_call_is_refused(tokenizer):
    lean = lean_backbone(model(tokenizer, 4))
    ids, mask = encode_prompts(tokenizer, ["ab", "ab"])
    with torch.no_grad():
        dec = LeanDecoder(lean, mask, 4, share_prompts=True)
        dec.prefill(ids, mask, positions_from_mask(mask))
        q = torch.zeros(2, 4, 2, 8)
        with pytest.raises(ValueError, match="one position per row"):
            dec.cache.attend(0, q, q[:, :, :, :], q, None, 1.0)
