"""Parameter-efficient training through the peft library: LoRA adapters (model.peft=lora), resolved once when the
policy loads (`apply_peft`), and what the rest of posttrain asks of an adapted model.

    apply_peft(model, cfg)        the model as a peft model (only the adapter trains), or unchanged (peft null);
                                  a target module the model lacks is a one-line ConfigError listing its names
    reference_of(policy)          pi_ref for the KL term: with an adapter, the same module with it switched off
                                  (peft's `disable_adapter()`), no second copy; otherwise a frozen deep copy
    trainable_state_dict(model)   what a checkpoint holds of a model: the adapter (its trainable tensors) with
                                  peft, the whole state dict without; `load_trainable_state_dict` puts it back
    plain_state_dict(model)       the base weights under the base model's own names (a critic starts from them)
    save_merged(model, out)       out/ the merged model (AutoModelForCausalLM loads it), out/adapter/ the adapter
                                  (PeftModel.from_pretrained on the base loads it)

The lean forward (models/lean.py) does not read adapter weights, so an adapted model runs through the
transformers/peft forward, for training and generation alike (`lean_backbone` refuses it with a logged reason).
peft is imported only here, and only when model.peft is set (the `peft` extra).
"""

from __future__ import annotations

import copy
import difflib
import warnings
from pathlib import Path

import torch

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError


def _peft():
    try:
        import peft  # noqa: PLC0415 (the optional extra)
    except ImportError:
        raise ConfigError("model.peft needs the peft library: pip install 'posttrain[peft]' (or pip install "
                          "'peft>=0.13')") from None
    return peft


def is_peft(model) -> bool:
    """Whether `model` is a peft model (an adapter around a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what LoRA's target_modules match), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_target_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Every name in model.lora.target_modules must be a linear layer of `model`; else one line naming them."""
    names = linear_names(model)
    for target in targets:
        if target not in names:
            close = difflib.get_close_matches(target, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"model.lora.target_modules: {type(model).__name__} has no linear module "
                              f"'{target}'{hint}; its linear modules are {', '.join(names)}")


def apply_peft(model, cfg: ModelConfig, seed: int = 0):
    """`model` with cfg.peft's adapter (peft's get_peft_model: the base weights frozen, the adapter trainable),
    or `model` itself when cfg.peft is None. The adapter's initial weights (LoRA's A; B starts at 0) are drawn
    from `seed` alone, leaving the global RNG as it was."""
    if cfg.peft is None:
        return model
    if cfg.peft == "prompt_tuning":
        raise ConfigError("model.peft=prompt_tuning is not available yet: the training forward and generation "
                          "would need to put the soft prompt before every prompt (docs/peft.md); use model.peft=lora")
    peft = _peft()
    lora = cfg.lora
    check_target_modules(model, lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers 5.x the deprecated is_gradient_checkpointing: a FutureWarning per load, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def hf_module(model):
    """The module whose forward takes transformers' arguments and runs the adapted model: a LoRA model's base
    model (its projections replaced by peft's LoRA layers in place), anything else itself."""
    return model.get_base_model() if is_peft(model) else model


class AdapterOff:
    """The policy with its adapter switched off (peft's `disable_adapter()`): the base model, pi_ref, computed by
    the very module that trains, without a second copy. Called like the model; holds no parameters of its own."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def parameters(self):
        return self.policy.parameters()

    def to(self, device):  # the policy moves itself
        return self

    def eval(self):
        return self


def reference_of(policy):
    """pi_ref, the starting policy frozen: with an adapter (zero at the start), the policy with the adapter
    switched off; otherwise a frozen deep copy."""
    if is_peft(policy):
        return AdapterOff(policy)
    return copy.deepcopy(policy).eval().requires_grad_(False)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `model`: with peft, the tensors that train (the adapter); else everything."""
    if not is_peft(model):
        return model.state_dict()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_trainable_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` back (the frozen base is the one model.path or the seed gives)."""
    if not is_peft(model):
        model.load_state_dict(sd)
        return
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or names - set(sd):
        raise ValueError(f"the checkpoint's adapter does not fit the model (missing {sorted(names - set(sd))[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")


def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's weights under its own names (without adapter tensors): the starting policy's, as long
    as the adapter is zero (it is at setup)."""
    if not is_peft(model):
        return model.state_dict()
    base = model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in base.items() if ".lora_" not in k}


def merged_copy(model):
    """A plain transformers model with the adapter merged into its weights (W + (alpha/r) B A); `model` is left
    as it is."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def save_merged(model, out: Path) -> None:
    """out/: the merged model (safetensors); out/adapter/: the adapter alone (adapter_config.json,
    adapter_model.safetensors), for PeftModel.from_pretrained on the base model."""
    merged_copy(model).save_pretrained(out, safe_serialization=True)
    with warnings.catch_warnings():  # peft's save asks the deprecated transformers name (peft 0.21, transformers 5.2x)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.save_pretrained(out / "adapter", safe_serialization=True)


def refuse_peft(cfg: ModelConfig, command: str, why: str) -> None:
    """A one-line ConfigError for a command that does not train with model.peft yet (before anything is written)."""
    if cfg.peft is not None:
        raise ConfigError(f"model.peft={cfg.peft} is not available with `posttrain {command}` yet ({why}); set "
                          "model.peft=null, or use sft, rl, dpo or rft")
