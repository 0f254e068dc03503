"""Load any local Hugging Face causal LM (or build the tiny one), and save in the same format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from posttrain.config import ModelConfig
from posttrain.errors import ModelLoadError

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # no per-file bars when loading or saving a 1M-parameter model


def load_policy(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy and its tokenizer: `cfg.path` through the HF Auto classes, or the tiny model when None."""
    if cfg.path is None:
        from posttrain.models.tiny import build_tiny_model
        from posttrain.models.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        return build_tiny_model(cfg, tokenizer, seed=seed), tokenizer
    path = Path(cfg.path)
    if not path.is_dir():
        raise ModelLoadError(f"model.path: directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model.path: {path} has no config.json (not a Hugging Face model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.path: cannot load a tokenizer from {path}: {err}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"model.path: the tokenizer in {path} has neither a pad nor an eos token")
        log.warning("tokenizer in %s has no pad token; using its eos token %r for padding", path,
                    tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.path: cannot load a causal LM from {path}: {err}") from None
    return model, tokenizer


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer so the HF Auto classes load them back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
