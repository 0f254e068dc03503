"""LoRA through peft (posttrain/models/adapters.py): the config checked against the model, the lean forward never
bypassing the adapter (training forward and generation), the reference as the same module with the adapter off,
checkpoint weights as the adapter alone, and final/ as the merged model plus final/adapter/ (prompt tuning:
tests/models/test_prompt_tuning.py)."""

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.config import build_config  # noqa: E402
from posttrain.errors import ConfigError  # noqa: E402
from posttrain.models import load_policy, save_pretrained  # noqa: E402
from posttrain.models.adapters import (AdapterOff, apply_peft, load_trainable_state_dict,  # noqa: E402
                                       reference_of, trainable_state_dict)
from posttrain.models.chat import encode_prompts  # noqa: E402
from posttrain.models.lean import lean_backbone  # noqa: E402
from posttrain.models.logprobs import response_logprobs  # noqa: E402
from posttrain.rollout.generate import generate  # noqa: E402
from tests.conftest import tiny_run_dict  # noqa: E402

LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8"]


def lora_model(tmp_path, *overrides, seed=0):
    cfg = build_config(tiny_run_dict(tmp_path), [*LORA, *overrides])
    model, tokenizer = load_policy(cfg.model, seed=seed)
    return cfg, model, tokenizer


def perturb_adapter(model, seed=1, which="lora_B", scale=0.5):
    """Non-zero LoRA B matrices (peft starts them at 0, where the adapter is the identity and proves nothing), or
    with which="lora_A" A drawn afresh."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def batch(tokenizer, model, n=4):
    ids, mask = encode_prompts(tokenizer, ["1+2=", "13+4=", "7+7=", "20+1="][:n])
    return generate(model, ids, mask, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))


def test_only_the_adapter_trains_and_the_defaults_cover_attention_and_mlp(tmp_path):
    _, model, _ = lora_model(tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable), proj


def test_an_unknown_target_module_is_one_line_naming_the_models_modules(tmp_path):
    with pytest.raises(ConfigError) as err:
        lora_model(tmp_path, "model.lora.target_modules=[q_proj,qkv_proj]")
    msg = str(err.value)
    assert "\n" not in msg and "model.lora.target_modules" in msg and "'qkv_proj'" in msg
    assert "q_proj, up_proj, v_proj" in msg  # the names the model has


@pytest.mark.parametrize("real", [False, True], ids=["tiny", "stand_in"])
def test_the_lean_forward_never_bypasses_the_adapter(tmp_path, real, request):
    """The lean forward reads peft's LoRA layers (models/lean_lora.py: merged in generation, factored in training):
    the log-probs of generation and of the training forward are the adapted model's as peft computes them, not the
    base's, and the first PPO ratio stays 1 (gradients: tests/models/test_lean_lora.py)."""
    extra = [f"model.path={request.getfixturevalue('stand_in')}"] if real else []
    _, model, tokenizer = lora_model(tmp_path, *extra)
    perturb_adapter(model)
    model.eval()
    assert lean_backbone(model) is not None
    b = batch(tokenizer, model)
    logprobs, _ = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    assert torch.allclose(logprobs, b.rollout_logprobs, atol=1e-5)  # ratio 1 between generation and training
    # the same tokens scored by peft's own forward, and by the model without its adapter (which differs)
    ids = torch.cat([b.prompt_ids, b.response_ids], 1)
    attn = torch.cat([b.prompt_mask, b.response_mask.long()], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    T = b.response_ids.size(1)
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1].log_softmax(-1)
        with model.disable_adapter():
            off = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1].log_softmax(-1)
    pick = lambda lp: lp.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1) * b.response_mask  # noqa: E731
    assert torch.allclose(logprobs, pick(own), atol=1e-6)
    assert not torch.allclose(logprobs, pick(off), atol=1e-3)


def test_the_reference_is_the_same_module_with_the_adapter_off_and_equals_the_base_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_LEAN", "0")
    cfg, model, tokenizer = lora_model(tmp_path)
    plain, _ = load_policy(cfg.model.model_copy(update={"peft": None}), seed=0)  # same seed: the same base weights
    perturb_adapter(model)
    model.eval()
    ref = reference_of(model)
    assert isinstance(ref, AdapterOff) and ref.policy is model  # no second copy of the weights
    b = batch(tokenizer, plain)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    with torch.no_grad():
        ref_lp, _ = response_logprobs(ref, *args)
        plain.eval()
        plain_lp, _ = response_logprobs(plain, *args)  # POSTTRAIN_LEAN=0: the same (transformers) forward
        policy_lp, _ = response_logprobs(model, *args)
    assert torch.equal(ref_lp, plain_lp)
    assert not torch.allclose(policy_lp, plain_lp, atol=1e-3)  # the adapter is on again outside the context


def test_checkpoint_weights_are_the_adapter_alone_and_load_back(tmp_path):
    _, model, _ = lora_model(tmp_path)
    perturb_adapter(model)
    sd = trainable_state_dict(model)
    assert sd and all(".lora_" in k for k in sd)
    _, fresh, _ = lora_model(tmp_path)
    load_trainable_state_dict(fresh, sd)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21's from_pretrained
def test_final_is_the_merged_model_and_final_adapter_loads_on_the_base(tmp_path, stand_in):
    _, model, tokenizer = lora_model(tmp_path, f"model.path={stand_in}")
    perturb_adapter(model)
    model.eval()
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    assert (out / "adapter" / "adapter_config.json").is_file()
    ids, mask = encode_prompts(tokenizer, ["What is 2+2?", "Hello"])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not any(".lora_" in k for k in merged.state_dict())
        assert (merged(input_ids=ids, attention_mask=mask).logits - want).abs().max() < 1e-5
        base = AutoModelForCausalLM.from_pretrained(stand_in)
        again = PeftModel.from_pretrained(base, out / "adapter").eval()
        assert (again(input_ids=ids, attention_mask=mask).logits - want).abs().max() < 1e-6
    assert any(".lora_" in k for k in model.state_dict())  # saving merged a copy, not the training model


def test_apply_peft_without_peft_is_the_model_itself(tiny_model, tiny_model_cfg):
    assert apply_peft(tiny_model, tiny_model_cfg) is tiny_model
    assert trainable_state_dict(tiny_model).keys() == tiny_model.state_dict().keys()


def test_a_sync_sends_a_tied_weight_once_and_the_worker_ties_it_the_same_way(tmp_path, stand_in):
    from posttrain.models.adapters import synced_state_dict
    from posttrain.rollout.engines import TorchEngine, state_dict_sha256

    cfg = build_config(tiny_run_dict(tmp_path), [f"model.path={stand_in}"])
    learner, _ = load_policy(cfg.model, seed=0)
    worker, _ = load_policy(cfg.model, seed=0)
    assert learner.lm_head.weight is learner.model.embed_tokens.weight  # SmolLM2 ties them
    with torch.no_grad():
        learner.model.embed_tokens.weight.add_(1.0)
    sent = synced_state_dict(learner)
    assert "model.embed_tokens.weight" in sent and "lm_head.weight" not in sent
    assert set(sent) == set(learner.state_dict()) - {"lm_head.weight"}
    sha = TorchEngine(worker).load_weights({k: v.clone() for k, v in sent.items()})
    assert sha == state_dict_sha256(sent)
    assert torch.equal(worker.lm_head.weight, learner.lm_head.weight)  # set through the tie
