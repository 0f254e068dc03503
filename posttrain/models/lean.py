"""A lean forward pass for Llama-family models (Llama, Qwen2): the model's own parameters, fewer ops.

Why: on CPU a ~1M-parameter model spends most of a decode step in per-op overhead, not in arithmetic. The HF
forward runs ~60 small ops per layer (three projections, a mask built on every call, rotate-half copies,
a growing KV cache concatenated on every step); this one runs ~15: one matmul for q, k and v, one for gate
and up, `torch.rms_norm`, attention (`attention`: small matmuls or SDPA) against a KV cache preallocated
for the whole generation, and one additive mask built once per batch. Same equations, same weights (read
from the modules at each call, so optimizer steps are seen), so it agrees with the HF forward to float
rounding (~1e-6); generation and the training forward both use it, so the PPO ratio stays 1.

`lean_backbone(model)` returns None for anything it does not cover (another architecture, a RoPE variant
whose frequencies change with the length, hooks, dropout in training mode, sliding
windows, and any projection or norm that is not exactly the module it reads weights from, such as a quantised
linear or a LoRA variant it does not read: the reason is logged once); callers then use the HF forward.
POSTTRAIN_LEAN=0 in the environment switches it off. peft's vanilla LoRA layers are read exactly
(models/lean_lora.py: factored under autograd, merged into the fused weights otherwise), and the reference
`AdapterOff` runs the same backbone with the adapters left out.

Shapes: B = rows, L = positions in this call, S = key positions (cache length), C = hidden size,
H / Hkv = query / key-value heads, D = head size.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.models.adapters import AdapterOff, hf_module
from posttrain.models.lean_lora import AdaptedLinear, fused, lora_base
from posttrain.models.lean_ops import rms_norm, swiglu
from posttrain.models.packed import PackedLinear, fixed_store, linear, packing_available
from posttrain.models.shared_kv import SharedPromptKV

# Backbone classes whose decoder layers are exactly: RMSNorm, q/k/v (optional bias) with RoPE, attention,
# o_proj, residual, RMSNorm, SwiGLU MLP (no bias), residual.
_BACKBONES = {"LlamaModel", "Qwen2Model"}
log = logging.getLogger(__name__)
_UNSUPPORTED_ROPE = ("dynamic", "longrope")  # frequencies depend on the sequence length


def enabled() -> bool:
    return os.environ.get("POSTTRAIN_LEAN", "1") != "0"


def _backbone_supported(backbone) -> bool:
    cfg = backbone.config
    if type(backbone).__name__ not in _BACKBONES or not enabled():
        return False
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if any(word in rope for word in _UNSUPPORTED_ROPE):
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "mlp_bias", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return False
    if backbone.training and getattr(cfg, "attention_dropout", 0.0) > 0:
        return False
    embed = backbone.embed_tokens
    if type(embed) is not torch.nn.Embedding or embed.max_norm is not None or embed.scale_grad_by_freq:
        return False
    return True


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unrecognised_module(backbone) -> str | None:
    """The first module of the decoder stack that is not what the lean forward reads its weights from (exactly
    torch.nn.Linear projections or peft's vanilla LoRA layers around them (`lean_lora.lora_base`), the model's own
    RMSNorm), as "layers.3.self_attn.q_proj (Linear8bitLt)"; None if all are. Another wrapped projection (a
    quantised linear, DoRA) has its own forward, which reading its `.weight` would skip: the output would be
    another function's, and nothing else would notice."""
    for i, layer in enumerate(backbone.layers):
        parts = [("self_attn", name) for name in _LINEARS] + [("mlp", name) for name in _MLP]
        for block, name in parts:
            module = getattr(getattr(layer, block, None), name, None)
            if lora_base(module) is None:
                return f"layers.{i}.{block}.{name} ({type(module).__name__})"
        for name in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, name, None)
            if module is None or not type(module).__name__.endswith("RMSNorm") or list(module.children()):
                return f"layers.{i}.{name} ({type(module).__name__})"
    norm = getattr(backbone, "norm", None)
    if norm is None or not type(norm).__name__.endswith("RMSNorm") or list(norm.children()):
        return f"norm ({type(norm).__name__})"
    return None


_REFUSED: dict[int, str] = {}  # id(model) -> the reason already logged


def _refuse(model, reason: str) -> None:
    """Log once per model why it runs through transformers' forward instead of the lean one."""
    if _REFUSED.get(id(model)) != reason:
        _REFUSED[id(model)] = reason
        log.info("the lean forward does not cover %s: %s; using transformers' forward", type(model).__name__, reason)


def _hooked(model) -> bool:
    """Forward hooks anywhere (the lean forward would skip them)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def lean_backbone(model) -> "LeanBackbone | None":
    """The lean view of `model` (a causal LM or a scalar-head model around a supported backbone), or None. A peft
    model is looked at through its base model (its LoRA layers read by models/lean_lora.py); `AdapterOff(policy)`
    (the LoRA reference) is the policy's view with the adapters left out."""
    if isinstance(model, AdapterOff):
        lean = lean_backbone(model.policy)
        if lean is not None:
            lean.adapters = False
        return lean
    model = hf_module(model)
    backbone = getattr(model, "model", None) if not type(model).__name__.endswith("Model") else model
    if backbone is None or not _backbone_supported(backbone) or _hooked(model):
        return None
    if (module := unrecognised_module(backbone)) is not None:
        _refuse(model, f"{module} is not a module it reads")
        return None
    head = None
    if model is not backbone:
        if type(model).__name__.endswith("ForCausalLM"):
            head = model.get_output_embeddings()
            if type(head) is not torch.nn.Linear or getattr(model.config, "final_logit_softcapping", None):
                _refuse(model, f"lm_head ({type(head).__name__}) is not a plain linear layer")
                return None
    return LeanBackbone(backbone, head)


def attention_bias(key_mask: Tensor, queries: int) -> Tensor:
    """(B, S) key mask -> (B, 1, queries, S) additive bias: 0 where the query may attend, the most negative
    float elsewhere (finite, so fully masked padding rows stay finite). Queries are the last `queries` key
    positions and attend causally."""
    S = key_mask.size(1)
    allowed = key_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    if queries > 1:
        causal = torch.ones(queries, S, dtype=torch.bool, device=key_mask.device).tril(S - queries)
        allowed = allowed & causal
    return torch.zeros(allowed.shape, device=key_mask.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


# Score matrices up to this many entries per head (queries x keys) take the explicit matmul-softmax-matmul path.
SMALL_ATTENTION = 1 << 14


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, recompute: bool = True) -> Tensor:
    """softmax(q k^T * scale + bias) v. q (B, H, L, D), k and v (B, Hkv, S, D), bias (B, 1, L, S) -> (B, H, L, D).

    Small problems (L * S <= SMALL_ATTENTION, e.g. a GRPO response pass of 8 queries over 15 keys) run as two
    batched matmuls and a softmax: on this CPU 3.8x faster than `scaled_dot_product_attention` forward and 2.4x
    forward + backward at (64, 4, 8, 32) x 15 keys, where SDPA's flash kernel is mostly fixed cost; larger ones
    use SDPA (flash, no (L, S) matrix kept). Both compute the same equation; they differ by float rounding (~1e-6).
    Under autograd a large small-path problem is recomputed in the backward pass rather than kept (RECOMPUTE_SCORES),
    unless `recompute` is False (the caller's whole layer is recomputed already: model.gradient_checkpointing).
    """
    L, S = q.size(2), k.size(2)
    if L * S > SMALL_ATTENTION:
        if q.requires_grad and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 mixed precision on a CPU: SDPA's flash kernel in float32 (inputs cast), never slower than its
            # bf16 one here and 1.6-1.7x faster backward at <= 128 queries (docs/performance.md, "bf16")
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=scale,
                                                      enable_gqa=q.size(1) != k.size(1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=q.size(1) != k.size(1))
    if recompute and q.requires_grad and torch.is_grad_enabled() and q.size(0) * q.size(1) * L * S > RECOMPUTE_SCORES:
        # the softmax output autograd would keep (float32, and its bf16 cast under autocast) is recomputed in the
        # backward pass instead: e.g. 680 of the 3,060 MiB a SmolLM2 GRPO micro-batch of 32 x 64 tokens keeps
        return checkpoint(_small_attention, q, k, v, bias, scale, use_reentrant=False)
    return _small_attention(q, k, v, bias, scale)


# Score tensors (B x H x L x S) larger than this, under autograd, are recomputed in the backward pass (above).
RECOMPUTE_SCORES = 1 << 21


def _small_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """`attention` as two batched matmuls and a softmax (the same equation and shapes)."""
    B, H, L, D = q.shape
    S = k.size(2)
    Hkv = k.size(1)
    group = H // Hkv  # grouped-query attention: query head h reads key-value head h // group
    # the group's query heads as extra rows of one matmul per key-value head: no copy of the keys and values
    scores = torch.matmul(q.reshape(B, Hkv, group * L, D), k.transpose(-1, -2)) * scale  # (B, Hkv, group*L, S)
    scores = scores.view(B, Hkv, group, L, S) + bias.unsqueeze(2)  # bias (B, 1, 1, L, S)
    out = torch.matmul(scores.softmax(-1).view(B, Hkv, group * L, S), v)  # (B, Hkv, group*L, D)
    return out.view(B, H, L, D)


@dataclass
class _Layer:
    ln1: Tensor
    w_qkv: Tensor | PackedLinear | AdaptedLinear  # PackedLinear (decoding on CPU) and AdaptedLinear (LoRA under
    b_qkv: Tensor | None                          # autograd) hold b_qkv, which is then None
    w_o: Tensor | PackedLinear | AdaptedLinear
    ln2: Tensor
    w_gate_up: Tensor | PackedLinear | AdaptedLinear
    w_down: Tensor | PackedLinear | AdaptedLinear

    def cast(self, dtype: torch.dtype) -> _Layer:
        """The matmul weights cast to `dtype` once, as autocast would at every call: a forward that runs the layers
        twice (a shared prompt, then the responses) then keeps one cast copy for its backward pass, not two."""
        def to(w):
            return None if w is None else w.to(dtype)
        return _Layer(self.ln1, to(self.w_qkv), to(self.b_qkv), to(self.w_o), self.ln2, to(self.w_gate_up),
                      to(self.w_down))

    def factored(self) -> bool:
        """Whether a matmul weight is LoRA's factored AdaptedLinear (not a plain tensor)."""
        return any(isinstance(w, AdaptedLinear) for w in (self.w_qkv, self.w_o, self.w_gate_up, self.w_down))

    def packed(self, rows: int) -> _Layer:
        """The same layer with its matmul weights packed for `rows` input rows (posttrain.models.packed)."""
        def pack(w, b=None):
            return w.repack(rows) if type(w) is PackedLinear else PackedLinear(w, b, rows)
        return _Layer(self.ln1, pack(self.w_qkv, self.b_qkv), None, pack(self.w_o), self.ln2, pack(self.w_gate_up),
                      pack(self.w_down))


class LeanBackbone:
    """The decoder stack of a supported model as plain tensor code over the module's parameters."""

    def __init__(self, backbone, head: torch.nn.Linear | None = None) -> None:
        cfg = backbone.config
        self.backbone, self.head = backbone, head  # head: a causal LM's lm_head
        self.H = cfg.num_attention_heads
        self.Hkv = getattr(cfg, "num_key_value_heads", None) or self.H
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.C = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.scale = self.D ** -0.5
        self.rotary = backbone.rotary_emb
        self.adapters = True  # apply peft LoRA adapters where the layers have them (False: the reference's base)

    def layers(self, merge: bool = False) -> list[_Layer]:
        """Fused weights (q|k|v and gate|up) of every layer; differentiable (torch.cat) when grad is on. With LoRA
        adapters (lean_lora.fused): factored (AdaptedLinear), or with `merge` merged into fused plain tensors."""
        on = self.adapters
        low = None if merge else _autocast_dtype(self.backbone.embed_tokens.weight.device)
        # In a packed.weights_fixed block the fused weights are made once and shared by its micro-batches (several
        # backward passes through one torch.cat or cast are fine: they save no tensors).
        store = fixed_store()
        key = ("lean.layers", id(self.backbone), merge, on, low, torch.is_grad_enabled())
        if store is not None and key in store:
            return store[key][1]
        out = []
        for layer in self.backbone.layers:
            a, m = layer.self_attn, layer.mlp
            w_qkv, b_qkv = fused([a.q_proj, a.k_proj, a.v_proj], True, on, merge)
            w = _Layer(layer.input_layernorm.weight, w_qkv, b_qkv, fused([a.o_proj], False, on, merge)[0],
                       layer.post_attention_layernorm.weight, fused([m.gate_proj, m.up_proj], False, on, merge)[0],
                       fused([m.down_proj], False, on, merge)[0])
            out.append(w if low is None or low == w_qkv.dtype else w.cast(low))
        # Not LoRA's factored AdaptedLinear under autograd: building it saves tensors, which the first micro-batch's
        # backward frees. The module is held so that its id is not reused while the block lasts.
        if store is not None and (not torch.is_grad_enabled() or not any(layer.factored() for layer in out)):
            store[key] = (self.backbone, out)
        return out

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) positions -> cos, sin (B, 1, L, D): the model's own rotary module."""
        cos, sin = self.rotary(self.backbone.embed_tokens.weight, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def forward(self, input_ids: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, layers: list[_Layer],
                cache: "KVCache | None" = None, used: Tensor | None = None) -> Tensor:
        """(B, L) ids -> (B, L, C) final hidden states (after the last norm).

        cos, sin: (B, 1, L, D) from `rope`; bias: (B, 1, L, S) additive attention bias, S = L without a
        cache, else the cache's filled length after this call; cache: keys and values of earlier positions,
        this call's are written at cache.length.

        used: (B, L) bool, the positions whose hidden states are needed (`padding_free`), or None for all. The
        position-wise work (norms, projections, MLP: nearly all the FLOPs) then runs on those N tokens packed
        as (N, C) rows, and only attention sees the (B, L) layout, where the other positions' keys and values
        are zeros. They must be positions the bias masks as keys (padding), so no used position's value
        changes; their own outputs are zeros.
        """
        B, L = input_ids.shape
        embed = self.backbone.embed_tokens
        where = None if used is None else used.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions
        ids = input_ids if where is None else input_ids.reshape(-1)[where]
        x = F.embedding(ids, embed.weight, embed.padding_idx)  # (B, L, C) or (N, C); no gradient to the pad row
        recompute = getattr(self.backbone, "gradient_checkpointing", False) and torch.is_grad_enabled()
        for i, w in enumerate(layers):
            if recompute:  # model.gradient_checkpointing: keep each layer's input, recompute the rest in backward
                x = checkpoint(self.layer, i, w, x, cos, sin, bias, cache, where, B, L, False, use_reentrant=False)
            else:
                x = self.layer(i, w, x, cos, sin, bias, cache, where, B, L)
        x = rms_norm(x, self.backbone.norm.weight, self.eps)
        return x if where is None else _unpack(x, where, B * L).view(B, L, self.C)

    def layer(self, i: int, w: _Layer, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache, where: Tensor | None,
              B: int, L: int, recompute_scores: bool = True) -> Tensor:
        """Decoder layer i on x, (B, L, C) or packed (N, C) at `where`: the residual stream after it. Its only side
        effect is `cache.append`, which a PrefixKV makes idempotent (a recomputed layer writes the same entry).
        recompute_scores: False inside a checkpointed layer, whose attention is recomputed with it anyway."""
        H, Hkv, D = self.H, self.Hkv, self.D
        half = D // 2
        h = rms_norm(x, w.ln1, self.eps)
        qkv = _unpack(linear(h, w.w_qkv, w.b_qkv), where, B * L)
        qkv = qkv.view(B, L, H + 2 * Hkv, D).transpose(1, 2)  # (B, H+2Hkv, L, D)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
        qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin  # RoPE on q and k at once
        q, k = qk[:, :H], qk[:, H:]
        if cache is None:
            a = attention(q, k, v, bias, self.scale, recompute_scores)
        else:  # stores k, v and attends over everything the cache holds (B, Hkv, S, D)
            a = cache.attend(i, q, k, v, bias, self.scale, recompute_scores)
        a = a.transpose(1, 2).reshape(B * L, H * D)
        x = x + linear(a.view(B, L, H * D) if where is None else a.index_select(0, where), w.w_o)
        h = rms_norm(x, w.ln2, self.eps)
        return x + linear(swiglu(linear(h, w.w_gate_up)), w.w_down)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., C) final hidden states -> (..., V) logits through the causal LM's head."""
        return linear(hidden, self.head.weight, self.head.bias)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """A full causal forward pass without a cache: (B, L) left-padded -> (B, L, C)."""
        cos, sin = self.rope(positions_from_mask(attention_mask))
        return self.forward(input_ids, cos, sin, attention_bias(attention_mask, input_ids.size(1)), self.layers(),
                            used=padding_free(attention_mask.bool()))

    def response_hidden(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                        response_mask: Tensor) -> Tensor:
        """The final hidden states that predict each response token: at the last prompt position and the
        first T-1 response positions. prompt (B, P) left-padded, response (B, T) right-padded -> (B, T, C).

        Rows with the same prompt (GRPO's G samples, DPO's chosen and rejected) run the prompt once: its keys
        and values are computed for the distinct prompts and shared, so only the response positions run per
        row. The same equations as one forward pass over prompt + response, with or without autograd.
        """
        T = response_ids.size(1)
        key_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
        inverse, first = distinct_rows(prompt_ids, prompt_mask)
        if len(first) == len(prompt_ids):  # nothing shared: one pass over prompt + response
            return self.hidden_states(torch.cat([prompt_ids, response_ids], dim=1), key_mask)[:, -T - 1:-1]
        layers = self.layers()
        ids_u, mask_u = prompt_ids[first], prompt_mask[first]
        cos, sin = self.rope(positions_from_mask(mask_u))
        prefix = PrefixKV(inverse)
        h_prompt = self.forward(ids_u, cos, sin, attention_bias(mask_u, ids_u.size(1)), layers, prefix,
                                used=padding_free(mask_u.bool()))
        positions = positions_from_mask(key_mask)[:, -T:]
        cos, sin = self.rope(positions)
        h_resp = self.forward(response_ids, cos, sin, attention_bias(key_mask, T), layers, prefix.shared(),
                              used=padding_free(response_mask.bool()))
        return torch.cat([h_prompt[:, -1:][inverse], h_resp[:, :-1]], dim=1)


# Padding-free position-wise work when at most this share of the positions is used (below it, the packing's
# gathers and scatters cost more than the rows they save).
PADDING_FREE_BELOW = 0.9


def padding_free(used: Tensor) -> Tensor | None:
    """(B, L) positions needed -> `used` itself when enough of the batch is padding to skip it, else None."""
    return used if used.numel() and float(used.sum()) < PADDING_FREE_BELOW * used.numel() else None


def _unpack(rows: Tensor, where: Tensor | None, n: int) -> Tensor:
    """(N, F) packed rows -> (n, F) with them at `where` and zeros elsewhere (unchanged when `where` is None)."""
    if where is None:
        return rows
    return rows.new_zeros(n, rows.size(-1)).index_copy(0, where, rows)


def positions_from_mask(mask: Tensor) -> Tensor:
    """(B, L) attention mask -> (B, L) position ids counting real tokens only (0 on left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def distinct_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P) prompts -> (inverse (B,), first (U,)): row b holds the same prompt as row first[inverse[b]]. The
    distinct prompts are numbered in the order they first appear (first is increasing), so rows grouped in
    order (GRPO's G samples of each prompt in turn) have inverse 0, ..., 0, 1, ..., 1, ..."""
    B = ids.size(0)
    _, inverse = torch.unique(torch.cat([ids, mask.long()], dim=1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), B, dtype=torch.long, device=ids.device).scatter_reduce_(
        0, inverse, torch.arange(B, device=ids.device), "amin")
    order = first.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=ids.device))
    return rank[inverse], first[order]


class KVStore:
    """What the lean layer calls on a cache: `attend` stores this call's keys and values (`append`, which returns
    everything stored, (B, Hkv, S, D)) and attends over them. models/shared_kv.py's SharedPromptKV stores them
    otherwise and has its own `attend`."""

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float,
               recompute: bool = True) -> Tensor:
        k, v = self.append(layer, k, v)
        return attention(q, k, v, bias, scale, recompute)


class PrefixKV(KVStore):
    """Keys and values of distinct prompts, collected in a first pass and shared by the rows that repeat them
    (`inverse`) in a second pass over the responses. Works under autograd (no in-place writes)."""

    def __init__(self, inverse: Tensor, sharing: bool = False) -> None:
        self.inverse, self.k, self.v, self.sharing = inverse, [], [], sharing

    def shared(self) -> PrefixKV:
        """The second pass's view: the same collected keys and values, each row's prefix put before its own. A
        separate object, so a layer of the first pass recomputed in the backward pass (model.gradient_checkpointing)
        still collects."""
        view = PrefixKV(self.inverse, sharing=True)
        view.k, view.v = self.k, self.v
        return view

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not self.sharing:  # by index: a layer recomputed in the backward pass rewrites its own entry
            if layer == len(self.k):
                self.k.append(k)
                self.v.append(v)
            else:
                self.k[layer], self.v[layer] = k, v
            return k, v
        return (torch.cat([self.k[layer][self.inverse], k], dim=2),
                torch.cat([self.v[layer][self.inverse], v], dim=2))


class KVCache(KVStore):
    """Keys and values for every layer, preallocated for `capacity` positions; `length` are filled."""

    def __init__(self, n_layers: int, B: int, Hkv: int, capacity: int, D: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.k = torch.empty(n_layers, B, Hkv, capacity, D, dtype=dtype, device=device)
        self.v = torch.empty(n_layers, B, Hkv, capacity, D, dtype=dtype, device=device)
        self.length = 0  # positions filled before the current call

    def keep(self, rows: Tensor) -> None:
        """Keep only `rows` (indices into the batch) of every layer's keys and values, up to `length`."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def rows(self, r: slice, start: int = 0) -> KVCache:
        """The cache of rows `r` from position `start` on as a view: what a pass over those rows appends is written
        into this cache (its position 0 is this cache's `start`)."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, r, :, start:], self.v[:, r, :, start:]
        return view

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`'s type right now, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


# The prefill runs over at most this many prompt tokens at a time (whole prompts; at least one): a pass over 64
# SmolLM2 prompts at once makes 37-74 MB activations that glibc maps fresh for every op and the kernel faults in
# page by page (docs/performance.md, "Page faults"); passes of ~2k tokens reuse the same heap blocks. None: one pass.
PREFILL_TOKENS: int | None = 2048


def row_chunks(mask: Tensor, tokens: int | None) -> list[slice]:
    """Consecutive row slices of a (B, P) mask, each holding at most `tokens` real tokens (or one row, if that row
    alone holds more); one slice of every row when `tokens` is None."""
    if tokens is None:
        return [slice(0, mask.size(0))]
    out, start, total = [], 0, 0
    for i, count in enumerate(mask.sum(1).tolist()):
        if i > start and total + count > tokens:
            out.append(slice(start, i))
            start, total = i, 0
        total += count
    out.append(slice(start, mask.size(0)))
    return out


class LeanDecoder:
    """Incremental decoding with a preallocated KV cache: `prefill` the prompts, then `step` one token at a time.

    Positions are passed in (real-token counts, as the training forward computes them); the attention bias
    masks the prompt's left padding and is built once; every response position is attended to (a finished
    row's later tokens are discarded by the caller, so what it attends to does not matter).

    share_prompts: rows with the same prompt (GRPO's G samples) decode against one copy of its keys and values
    (models/shared_kv.py), not one per row; `cache` is then a SharedPromptKV. Off, `cache` is a KVCache over
    every row (what speculative decoding's verifier takes over).
    """

    def __init__(self, lean: LeanBackbone, prompt_mask: Tensor, max_new_tokens: int,
                 share_prompts: bool = False) -> None:
        self.lean = lean
        with torch.no_grad():  # plain fused tensors (a LoRA adapter merged in) that can be cast and packed
            self.layers = lean.layers(merge=True)
        self.head_weight, self.head_bias = lean.head.weight, lean.head.bias
        low = _autocast_dtype(lean.head.weight.device)  # bf16 under model.dtype=bfloat16 (models/precision.py)
        if low is not None and low != self.head_weight.dtype:  # cast the matmul weights once, not every step
            self.layers = [_Layer(w.ln1, w.w_qkv.to(low), None if w.b_qkv is None else w.b_qkv.to(low),
                                  w.w_o.to(low), w.ln2, w.w_gate_up.to(low), w.w_down.to(low)) for w in self.layers]
            self.head_weight = self.head_weight.to(low)
            self.head_bias = None if self.head_bias is None else self.head_bias.to(low)
        B, P = prompt_mask.shape
        capacity = P + max_new_tokens
        device = lean.head.weight.device
        self.head = self.head_weight
        self.packed_rows = 0  # > 0: the matmul weights are packed for this many rows (posttrain.models.packed)
        if packing_available(low or self.head_weight.dtype, device):
            self._pack(B)
        key_mask = torch.cat([prompt_mask.bool(), torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
        self.bias = attention_bias(key_mask, 1)  # (B, 1, 1, capacity) for the decode steps
        self.prefill_bias = attention_bias(prompt_mask, P)
        self.dtype, self.capacity, self.max_new_tokens = low or lean.head.weight.dtype, capacity, max_new_tokens
        self.share_prompts = share_prompts
        self.cache: KVCache | SharedPromptKV | None = None  # made by `prefill`
        # cos/sin for every position a row can reach, indexed per step (static RoPE only: see lean_backbone)
        cos, sin = lean.rope(torch.arange(capacity, device=device).unsqueeze(0))
        self.cos_table, self.sin_table = cos[0, 0], sin[0, 0]  # (capacity, D)

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, positions: Tensor) -> Tensor:
        """(B, P) prompts -> (B, V) logits for the first response token.

        Repeated prompts (GRPO's G samples of each) are run once; their keys and values are then shared
        (`share_prompts`) or copied to every row. The distinct prompts run shortest first in passes of at most
        PREFILL_TOKENS tokens, each pass from its longest prompt's first token: the columns before it are left
        padding in all of its rows (their cache entries are zeros, masked). The same logits and cache as one pass
        over the padded batch, to float rounding (tests/models/test_chunked_prefill.py)."""
        B, P = prompt_ids.shape
        inverse, first = distinct_rows(prompt_ids, prompt_mask)
        n, Hkv, D, device = len(self.layers), self.lean.Hkv, self.lean.D, prompt_ids.device
        # The distinct prompts shortest first, so that a pass holds prompts of similar length and starts at its
        # longest one's first token: the columns before it are padding in every row of the pass and are skipped.
        by_length = prompt_mask[first].sum(1).argsort(stable=True)  # distinct prompts (in `first` order), sorted
        order = first[by_length]  # rows of prompt_ids, in prefill order
        ids, mask, bias, pos = prompt_ids[order], prompt_mask[order], self.prefill_bias[order], positions[order]
        cos, sin = self.cos_table[pos].unsqueeze(1), self.sin_table[pos].unsqueeze(1)
        cache = KVCache(n, len(order), Hkv, P, D, self.dtype, device)  # the prompts' keys and values, in order
        last = []  # (rows, C) final hidden state at each prompt's last position
        for r in row_chunks(mask, PREFILL_TOKENS):
            start = P - int(mask[r].sum(1).max())
            if start:  # masked keys of these rows: finite (zeros), never attended to
                cache.k[:, r, :, :start] = 0
                cache.v[:, r, :, :start] = 0
            h = self.lean.forward(ids[r, start:], cos[r, :, start:], sin[r, :, start:], bias[r, :, start:, start:],
                                  self.layers, cache.rows(r, start), used=padding_free(mask[r, start:].bool()))
            last.append(h[:, -1])
        back = by_length.argsort()  # back[i]: where distinct prompt i (in `first` order) sits in `order`
        logits = linear(torch.cat(last)[back], self.head, self.head_bias)[inverse]  # (B, V)
        if self.share_prompts and len(first) < B:
            self.cache = SharedPromptKV(cache.k[:, back], cache.v[:, back], prompt_mask[first], inverse,
                                        self.max_new_tokens)
        else:
            self.cache = KVCache(n, B, Hkv, self.capacity, D, self.dtype, device)
            self.cache.k[:, :, :, :P] = cache.k[:, back[inverse]]
            self.cache.v[:, :, :, :P] = cache.v[:, back[inverse]]
        self.cache.length = P
        return logits

    def keep(self, rows: Tensor) -> None:
        """Continue with only `rows` (indices into the current batch): finished rows leave the batch, and later
        steps cost what the rows still decoding cost."""
        self.cache.keep(rows)
        self.bias = self.bias[rows]
        if 0 < len(rows) <= self.packed_rows // 2:  # fewer rows than half of what the weights are packed for
            self._pack(len(rows))

    def _pack(self, rows: int) -> None:
        self.layers = [w.packed(rows) for w in self.layers]
        self.head = (self.head.repack(rows) if type(self.head) is PackedLinear
                     else PackedLinear(self.head_weight, self.head_bias, rows))
        self.packed_rows = rows

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """(B,) tokens at (B,) positions -> (B, V) logits for the next token."""
        cos = self.cos_table[positions].view(-1, 1, 1, self.lean.D)
        sin = self.sin_table[positions].view(-1, 1, 1, self.lean.D)
        end = self.cache.length + 1
        h = self.lean.forward(tokens.unsqueeze(1), cos, sin, self.bias[..., :end], self.layers, self.cache)
        self.cache.length = end
        return linear(h[:, -1], self.head, self.head_bias)
