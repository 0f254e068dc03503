"""Shared fixtures: the character tokenizer, a tiny Llama, and a factory for tiny run configs.

Everything here is sized so that a whole SFT + GRPO run takes about a second on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import ModelConfig, RunConfig, build_config
from posttrain.models import build_char_tokenizer, build_tiny_model

# hidden 32, 2 layers, 4 query heads sharing 2 key/value heads: ~20k parameters.
TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}


def tiny_run_dict(output_dir) -> dict:
    """A complete tiny run: every setting a test relies on is spelled out, so tuning the defaults in
    posttrain/config/ does not change what the tests measure."""
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "threads": 1,
        "progress": False,
        "model": dict(TINY_MODEL),
        "task": {"max_operand": 20, "num_eval": 20, "operators": ["+"], "demo_error": "drop_carry",
                 "demo_error_rate": 0.6},
        "sft": {"steps": 5, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 1, "eval_every": 0,
                "log_every": 1},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "lr": 5e-4,
               "warmup_steps": 1, "kl_coef": 0.1, "eval_every": 0, "mini_batches": 1, "ppo_epochs": 1,
               "advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": "token-mean",
               "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "eval": {"batch_size": 20, "max_new_tokens": 4},
    }


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits for the first
    (measured: 8 generated tokens took 2.4 s with 2 threads under load, 0.04 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(**TINY_MODEL)


@pytest.fixture
def tiny_model(tiny_model_cfg, tokenizer):
    return build_tiny_model(tiny_model_cfg, tokenizer, seed=0)


@pytest.fixture(scope="session")
def make_config():
    """`make_config(output_dir, "rl.kl_coef=0", ...)` -> a validated tiny RunConfig."""

    def make(output_dir, *overrides: str) -> RunConfig:
        return build_config(tiny_run_dict(output_dir), list(overrides))

    return make


SMOLLM2_TOKENIZER = Path(__file__).resolve().parent / "data" / "smollm2_tokenizer"


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (pad = EOS = <|im_end|>), saved as a
    model directory: what model.path points at where the real model would be (hidden 64, 2 layers, GQA)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out = tmp_path_factory.mktemp("smol") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
