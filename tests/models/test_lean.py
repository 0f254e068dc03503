"""The lean forward (posttrain.models.lean) against the HF forward it replaces: logits, training log-probs and
their gradients (with and without shared prompts), generation, critic values; and the automatic fallback to the
HF forward for models it does not cover."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model
from posttrain.models.lean import lean_backbone
from posttrain.models.loading import enable_gradient_checkpointing
from posttrain.models.logprobs import causal_lm_logits, response_logprobs
from posttrain.models.value import build_scalar_model, response_values
from posttrain.models.chat import encode_prompts
from posttrain.rollout import generate

PROMPTS = ["1+2=", "37+58=", "x", "hello world"]


def llama(tokenizer, kv_heads):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).eval()


def qwen2(tokenizer):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).float().eval()  # q/k/v carry biases


@pytest.fixture(params=["llama", "llama-gqa", "qwen2"])
def model(request, tokenizer):
    return {"llama": lambda: llama(tokenizer, 4), "llama-gqa": lambda: llama(tokenizer, 2),
            "qwen2": lambda: qwen2(tokenizer)}[request.param]()


def hf_only(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_LEAN", "0")


def sample(model, tokenizer, prompts, seed=0, max_new_tokens=8):
    ids, mask = encode_prompts(tokenizer, prompts)
    return ids, mask, generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed))


def test_lean_path_is_chosen_for_llama_and_qwen2(model):
    lean = lean_backbone(model)
    assert lean is not None and lean.head is model.lm_head


def test_lean_hidden_states_give_the_hf_logits(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        hf = causal_lm_logits(model, ids, mask, keep=ids.size(1))
        lean = lean_backbone(model)
        ours = lean.logits(lean.hidden_states(ids, mask))
    on = mask.bool()
    torch.testing.assert_close(ours[on], hf[on], atol=1e-5, rtol=0)


@pytest.mark.parametrize("repeat", [1, 3], ids=["distinct-prompts", "shared-prompts"])
def test_training_logprobs_and_gradients_equal_the_hf_forward(model, tokenizer, monkeypatch, repeat):
    prompts = [p for p in PROMPTS for _ in range(repeat)]
    ids, mask, out = sample(model, tokenizer, prompts)
    results = []
    for lean in (True, False):
        if not lean:
            hf_only(monkeypatch)
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, ids, mask, out.response_ids, out.response_mask,
                                              temperature=0.7, with_entropy=True)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp, ent, grads), (lp_hf, ent_hf, grads_hf) = results
    torch.testing.assert_close(lp, lp_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_hf, atol=1e-5, rtol=0)
    for name, g in grads_hf.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=1e-4, msg=name)


def test_generation_matches_the_hf_decode_loop(model, tokenizer, monkeypatch):
    prompts = [p for p in PROMPTS for _ in range(2)]  # shared prompts: the prefill runs each once
    *_, lean = sample(model, tokenizer, prompts, seed=3)
    hf_only(monkeypatch)
    *_, hf = sample(model, tokenizer, prompts, seed=3)
    assert torch.equal(lean.response_ids, hf.response_ids)
    assert torch.equal(lean.response_mask, hf.response_mask)
    torch.testing.assert_close(lean.rollout_logprobs, hf.rollout_logprobs, atol=1e-5, rtol=0)


def test_critic_values_equal_the_hf_forward(tokenizer, monkeypatch):
    critic = build_scalar_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                            intermediate_size=64), tokenizer, seed=0).eval()
    torch.nn.init.normal_(critic.score.weight)
    assert lean_backbone(critic) is not None and lean_backbone(critic).head is None
    ids, mask, out = sample(llama(tokenizer, 2), tokenizer, [p for p in PROMPTS for _ in range(2)])
    lean = response_values(critic, ids, mask, out.response_ids, out.response_mask)
    hf_only(monkeypatch)
    hf = response_values(critic, ids, mask, out.response_ids, out.response_mask)
    torch.testing.assert_close(lean, hf, atol=1e-5, rtol=0)


def test_other_models_fall_back_to_their_hf_forward(tokenizer):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64)).eval()
    assert lean_backbone(gpt2) is None
    ids, mask, out = sample(gpt2, tokenizer, PROMPTS)
    logprobs, _ = response_logprobs(gpt2, ids, mask, out.response_ids, out.response_mask)
    torch.testing.assert_close(out.rollout_logprobs, logprobs, atol=1e-5, rtol=0)


def test_hooks_and_the_switch_select_the_hf_forward_and_checkpointing_keeps_the_lean_one(tokenizer, monkeypatch):
    model = llama(tokenizer, 2)
    assert lean_backbone(model) is not None
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + 1)
    assert lean_backbone(model) is None  # a hook would be skipped: use the forward that runs it
    handle.remove()
    enable_gradient_checkpointing(model)  # model.gradient_checkpointing: the lean forward checkpoints its layers
    assert model.model.gradient_checkpointing and lean_backbone(model) is not None
    model.enable_input_require_grads()  # what a reentrant checkpoint needs: a hook on the embeddings
    assert lean_backbone(model) is None
    model.disable_input_require_grads()
    monkeypatch.setenv("POSTTRAIN_LEAN", "0")
    assert lean_backbone(model) is None


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_small_attention_path_equals_sdpa(kv_heads, monkeypatch):
    """The explicit matmul path for small score matrices computes SDPA's equation: same outputs and gradients,
    grouped-query attention and left padding included. A query that sees only padding gets some finite
    average on either path (different ones); callers discard those positions, so they are left out."""
    from posttrain.models import lean

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(3, kv_heads, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(3, kv_heads, 9, 8, generator=g, requires_grad=True)
    key_mask = torch.ones(3, 9, dtype=torch.long)
    key_mask[1, :3] = 0  # left padding
    key_mask[2, :6] = 0
    bias = lean.attention_bias(key_mask, 5)
    attends = (bias > torch.finfo(torch.float32).min).any(-1, keepdim=True)  # (B, 1, L, 1)
    assert not attends.all()  # row 2's first queries see only padding
    grad_out = torch.randn(3, 4, 5, 8, generator=g) * attends  # callers drop those positions

    def run(threshold):
        monkeypatch.setattr(lean, "SMALL_ATTENTION", threshold)
        out = lean.attention(q, k, v, bias, 8 ** -0.5)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    small, sdpa = run(5 * 9), run(5 * 9 - 1)
    assert all(torch.isfinite(t).all() for t in small)
    torch.testing.assert_close(small[0] * attends, sdpa[0] * attends, rtol=1e-5, atol=1e-6)
    for a, b in zip(small[1:], sdpa[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class AdapterLinear(torch.nn.Module):
    """A LoRA-shaped wrapper: the base projection plus a trainable low-rank update (B A x), B started non-zero so
    that the adapter changes the output."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.weight = base.weight  # what a reader of `.weight` would take, skipping the adapter
        g = torch.Generator().manual_seed(0)
        self.lora_a = torch.nn.Parameter(0.1 * torch.randn(rank, base.in_features, generator=g))
        self.lora_b = torch.nn.Parameter(0.1 * torch.randn(base.out_features, rank, generator=g))

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_a_wrapped_projection_falls_back_to_the_hf_forward_and_trains_the_adapter(tokenizer, caplog):
    model = llama(tokenizer, kv_heads=2)
    layer = model.model.layers[1].self_attn
    layer.q_proj = AdapterLinear(layer.q_proj)
    with caplog.at_level("INFO", logger="posttrain.models.lean"):
        assert lean_backbone(model) is None
    assert "layers.1.self_attn.q_proj (AdapterLinear)" in caplog.text and "transformers' forward" in caplog.text
    prompt_ids, prompt_mask, out = sample(model, tokenizer, ["1+2=", "30+4="])
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, out.response_ids, out.response_mask)
    torch.testing.assert_close(logprobs * out.response_mask, out.rollout_logprobs, atol=1e-5, rtol=0)  # ratio 1
    (logprobs * out.response_mask).sum().backward()
    assert layer.q_proj.lora_a.grad is not None and layer.q_proj.lora_a.grad.abs().sum() > 0
    # with every module plain again the lean path is taken
    layer.q_proj = layer.q_proj.base
    assert lean_backbone(model) is not None


@pytest.mark.parametrize("shared_prompts", [False, True], ids=["one_pass", "shared_prompts"])
def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients_bit_for_bit(tokenizer, shared_prompts):
    """model.gradient_checkpointing: each layer recomputed in the backward pass (the prompt pass of rows that share
    a prompt included, whose keys and values the response pass reads) gives exactly what the plain pass gives."""
    results = []
    for checkpointing in (False, True):
        model = llama(tokenizer, 2)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.eval()  # the RL learner's mode: transformers' forward would not checkpoint here, the lean one does
        prompts = ["1+2=", "1+2=", "30+4=", "30+4="] if shared_prompts else ["1+2=", "30+4=", "5+5=", "7+1="]
        ids, mask, out = sample(model, tokenizer, prompts)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logprobs, _ = response_logprobs(model, ids, mask, out.response_ids, out.response_mask)
        logprobs.sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in model.parameters()], sum(saved)))
    (plain_lp, plain_g, plain_saved), (ckpt_lp, ckpt_g, ckpt_saved) = results
    assert torch.equal(plain_lp, ckpt_lp)
    assert all(torch.equal(a, b) for a, b in zip(plain_g, ckpt_g))
    assert ckpt_saved < plain_saved / 2  # what autograd keeps: the layers' inputs, not their insides


def test_large_score_tensors_are_recomputed_in_backward_with_the_same_gradients(monkeypatch):
    """Under autograd, a small-path attention whose (B, H, L, S) scores exceed RECOMPUTE_SCORES keeps q, k, v and
    recomputes the softmax in the backward pass: the same output and gradients, bit for bit, and less kept."""
    from posttrain.models import lean

    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 8, 16, generator=g, requires_grad=True)
    k = torch.randn(4, 2, 12, 16, generator=g, requires_grad=True)
    v = torch.randn(4, 2, 12, 16, generator=g, requires_grad=True)
    bias = lean.attention_bias(torch.ones(4, 12, dtype=torch.long), 8)

    def run(threshold):
        monkeypatch.setattr(lean, "RECOMPUTE_SCORES", threshold)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = lean.attention(q, k, v, bias, 0.25)
        return out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out)), sum(saved)

    kept, recomputed = run(4 * 4 * 8 * 12), run(4 * 4 * 8 * 12 - 1)
    assert torch.equal(kept[0], recomputed[0])
    assert all(torch.equal(a, b) for a, b in zip(kept[1], recomputed[1]))
    assert recomputed[2] < kept[2]
