"""The tiny default policy: a Llama-family causal LM built from a config, not downloaded.

RMSNorm, rotary position embeddings, SwiGLU MLP and grouped-query attention (4 query heads sharing
2 key/value heads by default), about 1M parameters. Two builds of the same model, equal bit for bit from the
same seed (tests/test_startup.py):

    build_tiny_model(cfg, tokenizer, seed)   transformers' LlamaForCausalLM
    build_tiny_lean(cfg, tokenizer, seed)    TinyLlamaForCausalLM: the same torch.nn modules under the same
                                             names, initialised in the same order, without transformers'
                                             modelling code
    transformers_model(model)                the LlamaForCausalLM of either (the second: built on first use,
                                             sharing its parameters and buffers, so an optimizer keeps stepping)

Why the second: importing transformers' modelling code takes 1-1.5 s on a 2-core machine (its model registry
reads the source of every model it ships; the modelling module imports its loading and kernel integrations),
while the lean forward (posttrain/models/lean.py) only reads the modules' parameters. `posttrain demo` starts
SFT on TinyLlamaForCausalLM and hands transformers' model to GRPO (docs/performance.md, "Start-up"). It has no
forward of its own: calling it (the HF forward, where the lean one is switched off or refuses the model) and
saving it go through `transformers_model`, so checkpoints are the same Hugging Face directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from posttrain.config import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def _config_kwargs(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The Llama config whose shape comes from `cfg` and vocabulary from `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(**_config_kwargs(cfg, tokenizer))


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama causal LM whose shape comes from `cfg` and vocabulary from `tokenizer`."""
    from transformers import LlamaForCausalLM

    config = tiny_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


# ------------------------------------------------------------------ the same model without transformers

@dataclass
class TinyLlamaConfig:
    """What the lean forward and the run read of a LlamaConfig (`kwargs`: the arguments `tiny_config` passes it),
    with LlamaConfig's defaults for the rest (a test keeps them equal)."""

    kwargs: dict
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 10000.0, "rope_type": "default"})
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    attention_bias: bool = False
    pretraining_tp: int = 1

    def __getattr__(self, name: str):  # the LlamaConfig arguments as attributes (hidden_size, ...)
        kwargs = self.__dict__.get("kwargs", {})
        if name in kwargs:
            return kwargs[name]
        raise AttributeError(name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class LlamaRMSNorm(nn.Module):
    """The RMSNorm's weight (the lean forward applies it with torch.rms_norm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps


class LlamaRotaryEmbedding(nn.Module):
    """Default (static) RoPE, computed as transformers' LlamaRotaryEmbedding computes it."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.attention_scaling = 1.0
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) positions -> cos, sin (B, L, D) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: TinyLlamaConfig) -> None:
        super().__init__()
        D = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * D, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * D, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * D, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * D, c.hidden_size, bias=c.attention_bias)


class _MLP(nn.Module):
    def __init__(self, c: TinyLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)


class _DecoderLayer(nn.Module):
    def __init__(self, c: TinyLlamaConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaModel(nn.Module):
    """The decoder stack, laid out as transformers' LlamaModel (the lean forward knows backbones by class name)."""

    def __init__(self, c: TinyLlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.padding_idx = c.pad_token_id
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(_DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(c)
        self.gradient_checkpointing = False


class TinyLlamaForCausalLM(nn.Module):
    """transformers' LlamaForCausalLM's parameters and buffers, under its names, without its code; see the module
    docstring."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        """Random draws in transformers' order: every module's own torch init as it is built, LlamaModel's
        post-init over the decoder stack, the head's torch init, the head's post-init."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        _init_weights(self.model, config.initializer_range)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _init_weights(self.lm_head, config.initializer_range)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def forward(self):
        """transformers' forward (of `transformers_model(self)`), with its signature (the KV cache's keyword)."""
        return transformers_model(self).forward


@torch.no_grad()
def _init_weights(module: nn.Module, std: float) -> None:
    """transformers' PreTrainedModel init, children first: N(0, std) linear and embedding weights (the padding
    row zeroed), zero biases; norms and RoPE keep the values they were built with (transformers sets the same)."""
    for child in module.children():
        _init_weights(child, std)
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()


def build_tiny_lean(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> TinyLlamaForCausalLM:
    """`build_tiny_model`'s model, bit for bit, as a TinyLlamaForCausalLM (transformers is not imported)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLlamaForCausalLM(TinyLlamaConfig(_config_kwargs(cfg, tokenizer)))
    return model.float()


def transformers_model(model):
    """`model` as a transformers model: itself, or for a TinyLlamaForCausalLM the LlamaForCausalLM that holds the
    very same parameter and buffer tensors (built once, on first use; its own initialisation draws leave the
    global RNG as it was), with the same training/eval modes."""
    if not isinstance(model, TinyLlamaForCausalLM):
        return model
    twin = model.__dict__.get("_transformers")  # kept out of the module tree: not a submodule, not in state_dict
    if twin is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            twin = LlamaForCausalLM(LlamaConfig(**model.config.kwargs)).float()
        twin.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)  # the same Parameters
        model.__dict__["_transformers"] = twin
    for name, buffer in model.named_buffers():  # again each time: `.to()` replaces buffer tensors
        owner, _, attr = name.rpartition(".")
        twin.get_submodule(owner)._buffers[attr] = buffer
    for name, module in model.named_modules():
        twin.get_submodule(name).training = module.training
    return twin
