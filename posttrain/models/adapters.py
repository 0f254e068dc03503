"""Parameter-efficient training through the peft library: LoRA adapters (model.peft=lora) and soft prompts
(model.peft=prompt_tuning), resolved once when a model loads (`apply_peft`), and what the rest of posttrain asks
of an adapted model.

    apply_peft(model, cfg)        the model as a peft model (only the adapter trains), or unchanged (peft null);
                                  a target module the model lacks is a one-line ConfigError listing its names;
                                  `trained=("score",)` also trains those modules fully (a reward model's head)
    hf_module(model)              what takes transformers' arguments and runs the adapted model (below)
    reference_of(policy)          pi_ref for the KL term: with LoRA, the same module with the adapter switched off
                                  (peft's `disable_adapter()`), no second copy; with a soft prompt, the base with
                                  a frozen copy of the starting prompt; otherwise a frozen deep copy
    trainable_state_dict(model)   what a checkpoint holds of a model: the adapter (its trainable tensors) with
                                  peft, the whole state dict without; `load_trainable_state_dict` puts it back
    synced_state_dict(model)      what a Ray weight sync sends: the same, each tied tensor once
    plain_state_dict(model)       the base weights under the base model's own names (a critic starts from them)
    save_merged(model, out)       out/ the merged model (AutoModelForCausalLM loads it; a soft prompt cannot be
                                  merged, so there it is the unchanged base), out/adapter/ the adapter
                                  (PeftModel.from_pretrained on the base loads it)

A soft prompt P (N, C) goes before every sequence the same way in the training forward and in generation
(`SoftPromptForward`): inputs_embeds = [P; E(ids)], the attention mask gets N ones in front, and positions are
0..N-1 for P and N + (count of real tokens before) for the sequence, so left padding does not shift them and
a KV-cached decode step (whose cache already holds P) only adds N to its position.

The lean forward (models/lean.py) reads peft's vanilla LoRA layers exactly (models/lean_lora.py): factored,
W x + s B (A x), under autograd, and merged into its fused weights for generation and the no-grad passes; the
reference `AdapterOff` runs it with the adapters left out. What it cannot read exactly (dropout while training,
DoRA, a merged layer) runs through the transformers/peft forward, as does a soft prompt (`SoftPromptForward` has no
`.model`, so `lean_backbone` finds no backbone in it).
peft is imported only here, and only when model.peft is set (the `peft` extra).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import inspect
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError


def _peft():
    try:
        import peft  # the optional extra
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


def apply_peft(model, cfg: ModelConfig, seed: int = 0, tokenizer=None, trained: tuple[str, ...] = ()):
    """`model` with cfg.peft's adapter (peft's get_peft_model: the base weights frozen, the adapter trainable),
    or `model` itself when cfg.peft is None. The adapter's initial weights (LoRA's A, B starting at 0; a soft
    prompt drawn from the vocabulary's embeddings) come from `seed` alone, leaving the global RNG as it was.
    `trained`: modules trained fully beside the adapter (peft's modules_to_save; a scalar-head model's head, which
    makes it a SEQ_CLS peft model). `tokenizer` encodes model.prompt_tuning.init_text."""
    if cfg.peft is None:
        return model
    peft = _peft()
    if cfg.peft == "prompt_tuning":
        if trained:
            raise ConfigError("model.peft=prompt_tuning is for a causal LM's prompt; a scalar-head model (reward "
                              "model) takes model.peft=lora or null")
        return _prompt_tuned(peft, model, cfg, seed, tokenizer)
    lora = cfg.lora
    check_target_modules(model, lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none",
                             task_type="SEQ_CLS" if trained else "CAUSAL_LM",
                             modules_to_save=list(trained) or None)
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


@contextlib.contextmanager
def _quiet():
    """peft asks transformers 5.x the deprecated is_gradient_checkpointing: a FutureWarning per call, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _prompt_tuned(peft, model, cfg: ModelConfig, seed: int, tokenizer):
    """peft's prompt tuning (PromptTuningConfig) on `model`, its soft prompt (N, C) set to the input embeddings
    of init_text's tokens (repeated or cut to N), or of N tokens drawn uniformly from the vocabulary with `seed`
    (Lester et al. 2021's sampled-vocabulary initialisation: the prompt starts at the scale of real embeddings)."""
    pt = cfg.prompt_tuning
    n = pt.num_virtual_tokens
    embeddings = model.get_input_embeddings().weight  # (V, C)
    if pt.init_text is not None:
        if tokenizer is None:
            raise ValueError("apply_peft: model.prompt_tuning.init_text needs the tokenizer")
        ids = tokenizer(pt.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"model.prompt_tuning.init_text: {pt.init_text!r} encodes to no tokens")
        ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n])
    else:
        ids = torch.randint(embeddings.size(0), (n,), generator=torch.Generator().manual_seed(seed))
    start = embeddings.detach()[ids].clone()  # (N, C)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="RANDOM")
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        tuned = peft.get_peft_model(model, config)
    with torch.no_grad():
        soft_prompt(tuned).copy_(start)
    return tuned


def is_prompt_tuned(model) -> bool:
    """Whether `model` is a peft model with a soft prompt (prompt tuning)."""
    return is_peft(model) and model.peft_config[model.active_adapter].is_prompt_learning


def soft_prompt(model) -> Tensor:
    """(N, C) the trainable soft prompt of a prompt-tuned peft model (the parameter itself)."""
    return model.prompt_encoder[model.active_adapter].embedding.weight


@functools.cache
def _cache_keyword(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class SoftPromptForward:
    """A causal LM's forward with a soft prompt P (N, C) before every sequence: called with transformers'
    arguments (input_ids (B, L), attention_mask, position_ids counted over real tokens, a KV cache or none) like
    the model itself.

    A fresh sequence (no cache, or an empty one): inputs_embeds = [P; E(input_ids)] (B, N+L, C), mask [1_N; mask],
    positions [0..N-1; N + position_ids]. A decode step on a cache that holds P already: E(input_ids), mask
    [1_N; mask] (the caller's mask covers its own tokens only), positions N + position_ids. Logits come for the
    caller's tokens only, (B, L, V) (or its last logits_to_keep), never for P's positions."""

    def __init__(self, base, prompt: Tensor) -> None:
        self.base, self.prompt = base, prompt  # no `.model`: lean_backbone finds nothing to run lean
        self.base_model_prefix = base.base_model_prefix
        self.cache_keyword = _cache_keyword(type(base))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        B, N = input_ids.size(0), self.prompt.size(0)
        embeds = self.base.get_input_embeddings()(input_ids)  # (B, L, C)
        attention_mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)
        position_ids = position_ids + N
        if cache is None or cache.get_seq_length() == 0:
            embeds = torch.cat([self.prompt.to(embeds.dtype).unsqueeze(0).expand(B, -1, -1), embeds], dim=1)
            first = torch.arange(N, device=position_ids.device).expand(B, N)
            position_ids = torch.cat([first, position_ids], dim=1)
        if cache is not None:
            kwargs[self.cache_keyword] = cache
        kwargs["logits_to_keep"] = kwargs.get("logits_to_keep") or input_ids.size(1)  # none for P's positions
        return self.base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    __call__ = forward

    def parameters(self):  # the frozen base's (the prompt of a reference is a plain tensor)
        return self.base.parameters()

    def to(self, device):  # the base moves with the policy; a reference's own prompt moves here
        self.prompt = self.prompt.to(device)
        return self

    def eval(self):
        return self


def hf_module(model):
    """What takes transformers' arguments and runs the adapted model: a LoRA model's base model (its projections
    replaced by peft's LoRA layers in place), a prompt-tuned model's base behind `SoftPromptForward` (its
    trainable prompt), anything else itself."""
    if is_prompt_tuned(model):
        return SoftPromptForward(model.get_base_model(), soft_prompt(model))
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
    """pi_ref, the starting policy frozen: with LoRA (zero at the start), the policy with the adapter switched
    off; with a soft prompt, the frozen base behind a copy of the starting prompt (N x C values); otherwise a
    frozen deep copy."""
    if is_prompt_tuned(policy):
        return SoftPromptForward(policy.get_base_model(), soft_prompt(policy).detach().clone())
    if is_peft(policy):
        return AdapterOff(policy)
    return copy.deepcopy(policy).eval().requires_grad_(False)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `model`: with peft, the tensors that train (the adapter); else everything."""
    if not is_peft(model):
        return model.state_dict()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def synced_state_dict(model) -> dict[str, torch.Tensor]:
    """What a weight sync sends a rollout worker: `trainable_state_dict` with each tensor once. A tied weight (SmolLM2's
    lm_head is its embed_tokens) appears under two names in a state dict; the later name is left out, and loading
    the first into the worker's model (which ties them the same way) sets both."""
    out, seen = {}, set()
    for name, t in trainable_state_dict(model).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def load_trainable_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` back (the frozen base is the one model.path or the seed gives)."""
    if not is_peft(model):
        model.load_state_dict(sd)
        return
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    _, unexpected = model.load_state_dict(sd, strict=False)
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
    """A plain transformers model with the adapter merged into its weights (W + (alpha/r) B A; a fully trained
    head in place of the original); `model` is left as it is. A soft prompt is input, not weights: a prompt-tuned
    model gives its (unchanged) base model."""
    if is_prompt_tuned(model):
        return model.get_base_model()
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def save_merged(model, out: Path) -> None:
    """out/: the merged model (safetensors; with a soft prompt, the base model as it started); out/adapter/: the
    adapter alone (adapter_config.json, adapter_model.safetensors), for PeftModel.from_pretrained on out/ (or
    on the base model)."""
    merged_copy(model).save_pretrained(out, safe_serialization=True)
    with _quiet():  # peft's save asks the deprecated transformers name (peft 0.21, transformers 5.2x)
        model.save_pretrained(out / "adapter", safe_serialization=True)


def refuse_peft(cfg: ModelConfig, command: str, why: str) -> None:
    """A one-line ConfigError for a command that does not train with model.peft yet (before anything is written)."""
    if cfg.peft is not None:
        raise ConfigError(f"model.peft={cfg.peft} is not available with `posttrain {command}` yet ({why}); set "
                          "model.peft=null, or use sft, rl, dpo or rft")
