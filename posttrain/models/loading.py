"""Load any local Hugging Face causal LM (or build the tiny one), and save in the same format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging as hf_logging  # transformers itself, not its modelling code (models/tiny.py)

from posttrain.config import ModelConfig
from posttrain.errors import ModelLoadError
from posttrain.models.adapters import apply_peft, hf_module, is_peft, save_merged

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # no per-file bars when loading or saving a 1M-parameter model


def resolve_device(cfg: ModelConfig) -> torch.device:
    """model.device as a torch device ('auto': cuda when a GPU is visible); a missing GPU is a one-line error."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={cfg.device}: no CUDA device is visible to this process (torch "
                             f"{torch.__version__}); use model.device=cpu or auto")
    return device


def load_policy(cfg: ModelConfig, seed: int = 0,
                lean_tiny: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy (on model.device) and its tokenizer: `cfg.path` through the HF Auto classes, or the tiny model;
    with model.peft, wrapped in its adapter (posttrain/models/adapters.py: only the adapter trains).

    lean_tiny: the tiny model as posttrain's TinyLlamaForCausalLM (the same weights, without importing
    transformers' modelling code: models/tiny.py) where the lean forward runs it (no peft, POSTTRAIN_LEAN not
    0); `save_pretrained` and `posttrain.models.tiny.transformers_model` give its transformers model."""
    model, tokenizer = _load_policy(cfg, seed, lean_tiny)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_peft(model, cfg, seed, tokenizer)
    if cfg.gradient_checkpointing and hasattr(hf_module(model), "disable_input_require_grads"):
        hf_module(model).disable_input_require_grads()  # peft hooks the embeddings again (see below)
    return model.to(resolve_device(cfg)), tokenizer


def enable_gradient_checkpointing(model) -> None:
    """model.gradient_checkpointing: transformers' own switch (non-reentrant checkpoints, which need no input that
    requires grad, so a LoRA model's frozen embeddings are fine), or the flag the lean forward reads on the tiny
    lean model's backbone (models/lean.py checkpoints each layer under autograd)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):  # the name before transformers 5.2x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        # enabling also hooks the embeddings to make their output require grad, which only reentrant checkpoints
        # need; the hook would keep the lean forward off (it refuses hooked models)
        model.disable_input_require_grads()
    model.model.gradient_checkpointing = True


def _load_policy(cfg: ModelConfig, seed: int, lean_tiny: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.path is None:
        from posttrain.models import lean
        from posttrain.models.tiny import build_tiny_lean, build_tiny_model
        from posttrain.models.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        build = build_tiny_lean if lean_tiny and cfg.peft is None and lean.enabled() else build_tiny_model
        return build(cfg, tokenizer, seed=seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.path)
    check_model_dir(path, "model.path")
    arch = architectures(path)
    if arch and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in arch):
        raise ModelLoadError(f"model.path: {path} holds a {', '.join(arch)} (a reward model or critic), not a causal "
                             "LM with its language-model head; give the policy's directory (e.g. runs/sft_*/final)")
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
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.path: cannot load a causal LM from {path}: {err}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(f"model.path: {path} lacks {len(missing)} weights a causal LM needs ({missing[0]}"
                             f"{', ...' if len(missing) > 1 else ''}); it is not a policy checkpoint")
    return model, tokenizer


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model_dir(path: Path, key: str) -> None:
    """`path` must be a Hugging Face model directory; a run directory gets a hint at its final/ model."""
    if not path.is_dir():
        raise ModelLoadError(f"{key}: directory not found: {path}")
    if not (path / "config.json").is_file():
        hint = (f"; did you mean {path / 'final'}? (a run directory keeps its model in final/)"
                if (path / "final" / "config.json").is_file() else " (not a Hugging Face model directory)")
        raise ModelLoadError(f"{key}: {path} has no config.json{hint}")


def architectures(path: Path) -> list[str]:
    """The model classes a Hugging Face directory's config.json names ([] when it names none)."""
    try:
        return list(json.loads((path / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer so the HF Auto classes load them back; a peft model is saved merged
    (its adapter alone in out_dir/adapter/)."""
    from posttrain.models.tiny import transformers_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = transformers_model(model)  # a TinyLlamaForCausalLM saves as the LlamaForCausalLM it is
    if is_peft(model):
        save_merged(model, out)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
