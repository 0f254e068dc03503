"""The tiny Llama (shape, grouped-query attention, size, seeding) and save / load_policy round trips."""

import re

import pytest
import torch
from transformers import LlamaForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model, load_policy, save_pretrained
from posttrain.models.loading import ModelLoadError
from posttrain.models.chat import encode_prompts

PROMPTS = ["1+2=", "37+58=", "hello world\n", "9*9="]


def test_tiny_model_is_a_llama_with_grouped_query_attention(tiny_model, tokenizer):
    assert isinstance(tiny_model, LlamaForCausalLM)
    c = tiny_model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert c.num_key_value_heads < c.num_attention_heads
    assert len(tiny_model.model.layers) == 2
    head_dim = 32 // 4
    attn = tiny_model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * head_dim
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * head_dim
    assert tiny_model.lm_head.out_features == c.vocab_size == len(tokenizer)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_default_model_has_about_a_million_parameters(tokenizer):
    model = build_tiny_model(ModelConfig(), tokenizer)
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 <= n <= 1.2e6, n


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone(tiny_model_cfg, tokenizer):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tiny_model_cfg, tokenizer, seed=5)
    assert torch.equal(torch.rand(3), expected_draw)
    b = build_tiny_model(tiny_model_cfg, tokenizer, seed=5)
    c = build_tiny_model(tiny_model_cfg, tokenizer, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_load_policy_without_path_builds_the_seeded_tiny_model(tiny_model_cfg, tokenizer):
    model, tok = load_policy(tiny_model_cfg, seed=4)
    ref = build_tiny_model(tiny_model_cfg, tokenizer, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    assert tok("1+2=")["input_ids"] == tokenizer("1+2=")["input_ids"]


def test_save_then_load_policy_gives_identical_logits_and_tokenizer(tiny_model, tokenizer, tmp_path):
    with torch.no_grad():  # move every tensor off its initial value (norms start at exactly 1)
        g = torch.Generator().manual_seed(0)
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = save_pretrained(tiny_model, tokenizer, tmp_path / "ckpt")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert (out / "config.json").is_file()

    loaded, loaded_tok = load_policy(ModelConfig(path=str(out)))
    assert isinstance(loaded, LlamaForCausalLM)
    before = tiny_model.state_dict()
    after = loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    for text in [*PROMPTS, " a b\nc "]:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.padding_side == "left"
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id

    ids, mask = encode_prompts(tokenizer, PROMPTS)
    tiny_model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(expected, got)


def test_load_policy_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        load_policy(ModelConfig(path=str(missing)))


def test_load_policy_directory_without_config_json_names_the_path(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))) as err:
        load_policy(ModelConfig(path=str(tmp_path)))
    assert "config.json" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_trains(tmp_path, caplog):
    """The documented policy: no pad token -> EOS pads (one warning naming the directory); the run trains."""
    from posttrain.cli import main
    from tests.test_errors import TINY, no_special_tokens_model

    model_dir = no_special_tokens_model(tmp_path / "no_pad", keep_eos=True)
    config = tmp_path / "c.yaml"
    config.write_text("sft:\n  steps: 2\n")
    with caplog.at_level("WARNING"):
        code = main(["sft", str(config), *TINY, f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}"])
    assert code == 0
    assert any("has no pad token; using its eos token" in r.getMessage() and str(model_dir) in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
