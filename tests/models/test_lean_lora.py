"""The lean forward with peft's LoRA layers (posttrain/models/lean_lora.py): the same log-probs and the same adapter
gradients as peft's own forward, for every subset of projections and a model with q/k/v biases; no gradient and no
fused copy for the frozen base; merged in generation, so the first PPO ratio stays 1; the adapter switched off gives
the base exactly; and what it cannot read exactly (dropout while training, DoRA, a merged layer) is left to peft."""

import pytest
import torch

pytest.importorskip("peft")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from posttrain.config import build_config  # noqa: E402
from posttrain.models import load_policy  # noqa: E402
from posttrain.models.adapters import apply_peft, reference_of  # noqa: E402
from posttrain.models.lean import lean_backbone  # noqa: E402
from posttrain.models.lean_lora import AdaptedLinear  # noqa: E402
from posttrain.models.logprobs import response_logprobs  # noqa: E402
from tests.conftest import tiny_run_dict  # noqa: E402
from tests.models.test_adapters import LORA, batch, lora_model, perturb_adapter  # noqa: E402


def perturb_a(model, seed=2):
    """LoRA A matrices drawn afresh, so A's gradient (B^T dY x^T, zero while B = 0) is tested too."""
    perturb_adapter(model, seed, which="lora_A", scale=0.3)


def logprobs_and_grads(model, args, lean: bool, monkeypatch):
    """Summed log-probs' gradient w.r.t. every trainable tensor, through the lean forward or peft's (POSTTRAIN_LEAN=0)."""
    monkeypatch.setenv("POSTTRAIN_LEAN", "1" if lean else "0")
    model.zero_grad(set_to_none=True)
    lp, _ = response_logprobs(model, *args, with_entropy=False)
    (lp * torch.linspace(0.5, 1.5, lp.numel()).view_as(lp)).sum().backward()  # not a plain sum: weights per token
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    monkeypatch.delenv("POSTTRAIN_LEAN")
    return lp.detach(), grads


def check_equal_to_peft(model, tokenizer, monkeypatch):
    perturb_adapter(model)
    perturb_a(model)
    model.eval()
    assert lean_backbone(model) is not None
    b = batch(tokenizer, model)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    lean_lp, lean_g = logprobs_and_grads(model, args, True, monkeypatch)
    peft_lp, peft_g = logprobs_and_grads(model, args, False, monkeypatch)
    assert torch.allclose(lean_lp, peft_lp, atol=1e-5)
    assert torch.allclose(lean_lp, b.rollout_logprobs, atol=1e-5)  # generation (merged) = training (factored)
    assert lean_g.keys() == peft_g.keys() and lean_g
    for name in lean_g:
        assert peft_g[name].abs().sum() > 0, name
        rel = (lean_g[name] - peft_g[name]).norm() / peft_g[name].norm()  # float32 summation order: 1e-7..2e-5
        assert rel < 1e-4, (name, float(rel))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("targets", [None, "[q_proj,v_proj]", "[k_proj,down_proj]", "[gate_proj]"])
def test_lean_log_probs_and_adapter_gradients_equal_pefts(tmp_path, targets, monkeypatch):
    extra = [f"model.lora.target_modules={targets}"] if targets else []
    _, model, tokenizer = lora_model(tmp_path, *extra)
    check_equal_to_peft(model, tokenizer, monkeypatch)


def test_the_same_on_the_smollm2_shaped_stand_in(tmp_path, stand_in, monkeypatch):
    _, model, tokenizer = lora_model(tmp_path, f"model.path={stand_in}")
    check_equal_to_peft(model, tokenizer, monkeypatch)


def test_the_same_on_a_qwen2_model_whose_qkv_have_biases(tmp_path, tokenizer, monkeypatch):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    base = Qwen2ForCausalLM(config)
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    cfg = build_config(tiny_run_dict(tmp_path), LORA)
    model = apply_peft(base, cfg.model)
    check_equal_to_peft(model, tokenizer, monkeypatch)


def test_training_leaves_the_base_unfused_and_decoding_merges_the_adapter(tmp_path):
    _, model, _ = lora_model(tmp_path)
    perturb_adapter(model)
    lean = lean_backbone(model)
    layer = lean.layers()[0]
    assert type(layer.w_qkv) is AdaptedLinear and type(layer.w_down) is AdaptedLinear
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.w_qkv.weights[0] is q.base_layer.weight  # the frozen weight itself, no copy
    with torch.no_grad():
        assert type(lean.layers()[0].w_qkv) is AdaptedLinear  # log pi_old recomputed: the update's very ops
    merged = lean.layers(merge=True)[0]  # decoding
    assert type(merged.w_qkv) is torch.Tensor and not merged.w_qkv.requires_grad
    expected = q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert torch.allclose(merged.w_qkv[:q.out_features], expected, atol=1e-6)


def test_the_reference_with_the_adapter_off_is_the_base_exactly(tmp_path):
    cfg, model, tokenizer = lora_model(tmp_path)
    plain, _ = load_policy(cfg.model.model_copy(update={"peft": None}), seed=0)  # the same base weights
    perturb_adapter(model)
    model.eval()
    plain.eval()
    ref = reference_of(model)
    assert lean_backbone(ref) is not None and lean_backbone(ref).adapters is False
    b = batch(tokenizer, plain)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    with torch.no_grad():
        ref_lp, _ = response_logprobs(ref, *args)
        plain_lp, _ = response_logprobs(plain, *args)
        policy_lp, _ = response_logprobs(model, *args)
    assert torch.equal(ref_lp, plain_lp)  # the same lean ops on the same weights
    assert not torch.allclose(policy_lp, plain_lp, atol=1e-3)  # and the policy keeps its adapter
    with model.disable_adapter():  # peft's own switch is honoured too
        with torch.no_grad():
            off_lp, _ = response_logprobs(model, *args)
    assert torch.equal(off_lp, plain_lp)


def test_what_it_cannot_read_exactly_is_left_to_peft(tmp_path):
    _, model, _ = lora_model(tmp_path, "model.lora.dropout=0.1")
    model.train()
    assert lean_backbone(model) is None  # a dropout mask per projection
    model.eval()
    assert lean_backbone(model) is not None  # dropout is the identity in eval mode
    _, model, _ = lora_model(tmp_path)
    layer = model.get_base_model().model.layers[1].mlp.up_proj
    layer.merge()
    assert lean_backbone(model) is None
    layer.unmerge()
    assert lean_backbone(model) is not None
    cfg = build_config(tiny_run_dict(tmp_path), LORA)
    plain, _ = load_policy(cfg.model.model_copy(update={"peft": None}), seed=0)
    import peft
    dora = peft.get_peft_model(plain, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert lean_backbone(dora) is None


def test_in_bf16_log_pi_old_recomputed_equals_the_updates_forward_exactly(tmp_path, stand_in):
    """bf16 rounds two op orders differently by far more than float32 (models/precision.py recomputes log pi_old
    with the training forward for that reason): the no-grad recompute runs the update's very ops, so the first
    ratio is exactly 1 with a non-zero adapter."""
    _, model, tokenizer = lora_model(tmp_path, f"model.path={stand_in}")
    perturb_adapter(model, seed=3)
    model.eval()
    b = batch(tokenizer, model)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with torch.no_grad():
            old, _ = response_logprobs(model, *args)
        new, _ = response_logprobs(model, *args)
    assert new.requires_grad and torch.equal(old, new.detach())


def test_lora_gradients_accumulate_over_micro_batches_in_a_weights_fixed_block(tmp_path):
    """The learner accumulates a minibatch's gradient over micro-batches inside packed.weights_fixed(): with LoRA
    the lean layers (factored AdaptedLinear, whose construction saves tensors) are built per micro-batch, so the
    second backward works and the summed gradient equals the one of the whole batch (the first version shared them
    across micro-batches: "Trying to backward through the graph a second time" in the Ray LoRA run)."""
    from posttrain.models.packed import weights_fixed

    _, model, tokenizer = lora_model(tmp_path)
    perturb_adapter(model)
    b = batch(tokenizer, model)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    trainable = [p for p in model.parameters() if p.requires_grad]
    whole = torch.autograd.grad(response_logprobs(model, *args)[0].sum(), trainable)
    with weights_fixed():
        for half in (slice(0, 2), slice(2, 4)):
            response_logprobs(model, *(a[half] for a in args))[0].sum().backward()
    for p, want in zip(trainable, whole, strict=True):
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4)
