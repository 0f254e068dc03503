"""Padding-free position-wise work in the lean forward (posttrain.models.lean `padding_free`): with left-padded
prompts and right-padded responses of different lengths, the training log-probs, entropies and every
parameter's gradient equal those of the padded computation, with and without shared prompts; and the padding
share that switches it on."""

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model
from posttrain.models import lean as lean_module
from posttrain.models.chat import encode_prompts
from posttrain.models.lean import padding_free
from posttrain.models.logprobs import response_logprobs
from posttrain.rollout import generate

PROMPTS = ["1+2=", "37+58=", "x", "hello world, a longer prompt"]


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def model(request, tokenizer):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=request.param, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).train()  # dropout-free: train mode runs autograd as the update


@pytest.mark.parametrize("repeat", [1, 3], ids=["distinct-prompts", "shared-prompts"])
def test_padding_free_logprobs_and_gradients_equal_the_padded_ones(model, tokenizer, monkeypatch, repeat):
    prompts = [p for p in PROMPTS for _ in range(repeat)]
    ids, mask = encode_prompts(tokenizer, prompts)
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789"))]
    with torch.no_grad():
        out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                       generator=torch.Generator().manual_seed(1))
    lengths = out.response_mask.sum(1)
    assert lengths.min() < lengths.max() and (mask == 0).any()  # padding on both sides
    calls = []
    forward = lean_module.LeanBackbone.forward
    monkeypatch.setattr(lean_module.LeanBackbone, "forward",
                        lambda self, *a, **k: calls.append(k.get("used") is not None) or forward(self, *a, **k))
    results = []
    for below in (2.0, 0.0):  # always padding-free, never
        monkeypatch.setattr(lean_module, "PADDING_FREE_BELOW", below)
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, ids, mask, out.response_ids, out.response_mask,
                                              temperature=0.7, with_entropy=True)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert any(calls) and not all(calls)  # each setting took its own path
    (lp, ent, grads), (lp_pad, ent_pad, grads_pad) = results
    torch.testing.assert_close(lp, lp_pad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_pad, atol=1e-6, rtol=0)
    for name, g in grads_pad.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6 * max(1.0, g.abs().max().item()), rtol=1e-5, msg=name)


def test_padding_free_only_when_enough_is_padding():
    used = torch.ones(4, 10, dtype=torch.bool)
    assert padding_free(used) is None  # nothing to skip
    used[:, :2] = False  # 20% padding
    assert padding_free(used) is used
    used[:, :2] = True
    used[0, 0] = False  # 2.5%: not worth the gathers
    assert padding_free(used) is None
