"""LoRA in the lean forward: peft's adapted projections read exactly, factored while training, merged otherwise.

A peft LoRA layer computes y = W x + b + s B (A dropout(x)) (A (r, in), B (out, r), s = alpha / r). The lean forward (models/lean.py) fuses a layer's projections that read the same
input (q|k|v, gate|up) into one matmul; with adapters the fused group is

    factored (the training forward, with or without autograd):  y = [W_1 x; W_2 x; ...] + b + Bcat (Acat x)
        `AdaptedLinear`: Acat = [A_1; A_2; ...] (R, in) stacks the group's A's, Bcat = blockdiag(s_1 B_1, s_2 B_2,
        ...) (out, R), a zero block for a projection without an adapter. The frozen W's are not copied or fused
        (no gradient for them, no (out, in) tensor saved for the backward pass); A and B get their gradients
        through autograd.
    merged (decoding, `LeanDecoder`):  y = [W_1 + s_1 B_1 A_1; ...] x + b
        the adapter merged into a fused copy of the weights for that generation, so a decode step costs what
        the plain model's does and the packed CPU weights of models/packed.py apply.

The two are the same function of x to float rounding: ~1e-6 in float32, where the sampler's log-probs are
log pi_old and the first PPO ratio stays 1 within rl.ratio_tolerance. In bf16 the rounding of two op orders
differs by far more (0.3 in a log-prob was seen on SmolLM2 at step 1, with B = 0), which is why the RL loop then
recomputes log pi_old with the training forward (models/precision.py): that recompute is factored too, the same
ops as the update, so the ratio is exactly 1. With the adapter switched off (`disable_adapter()`, or the
reference `AdapterOff`) the base weights alone are used.

What it reads is checked once per call (`lora_base`): a peft `lora.Linear` around a plain nn.Linear, not merged,
one active adapter, vanilla LoRA (no DoRA or other variant, no lora_bias, not fan_in_fan_out), dropout 0 or the
module in eval mode.
Anything else is not read (models/lean.py then runs transformers/peft's forward), never read partly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _is_lora_linear(module) -> bool:
    return type(module).__name__ == "Linear" and type(module).__module__.startswith("peft.tuners.lora")


def lora_base(module) -> torch.nn.Linear | None:
    """The plain nn.Linear the lean forward reads for `module`: itself, or a vanilla peft LoRA layer's base layer
    (whose adapter `adapter_term` gives); None for anything it cannot read exactly."""
    if type(module) is torch.nn.Linear:
        return module
    if not _is_lora_linear(module) or type(module.base_layer) is not torch.nn.Linear:
        return None
    if module.merged or getattr(module, "fan_in_fan_out", False) or len(_active(module)) > 1:
        return None
    for name in _active(module):
        if name in module.lora_variant or module.lora_bias.get(name, False):
            return None  # DoRA and other variants, or a bias on B: not this equation
        if type(module.lora_A[name]) is not torch.nn.Linear or type(module.lora_B[name]) is not torch.nn.Linear:
            return None
        dropout = module.lora_dropout[name]
        if module.training and not (type(dropout) is torch.nn.Identity or getattr(dropout, "p", 1.0) == 0.0):
            return None  # dropout on the adapter's input: a mask per projection, which a fused group cannot draw
    return module.base_layer


def _active(module) -> list[str]:
    return [name for name in module.active_adapters if name in module.lora_A]


def adapter_term(module) -> tuple[Tensor, Tensor, float] | None:
    """(A (r, in), B (out, r), s) of the active adapter of a LoRA layer that `lora_base` accepted; None for a plain
    linear layer, no active adapter, or the adapter switched off."""
    if type(module) is torch.nn.Linear or module.disable_adapters or not (names := _active(module)):
        return None
    return module.lora_A[names[0]].weight, module.lora_B[names[0]].weight, float(module.scaling[names[0]])


class AdaptedLinear:
    """y = [W_1; W_2; ...] x + b + Bcat (Acat x) for x (..., in) -> (..., sum of outs): a fused group of frozen
    projections with their LoRA adapters factored (see the module docstring)."""

    def __init__(self, weights: list[Tensor], bias: Tensor | None, a: Tensor, b: Tensor) -> None:
        self.weights, self.bias, self.a, self.b = weights, bias, a, b

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    def to(self, dtype: torch.dtype) -> AdaptedLinear:
        """The frozen weights and the adapter cast to `dtype` (differentiably), once for every call that follows."""
        return AdaptedLinear([w.to(dtype) for w in self.weights], self.bias, self.a.to(dtype), self.b.to(dtype))

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # cast once: autocast would save a bf16 copy of x per matmul
            x = x.to(torch.get_autocast_dtype(x.device.type))
        parts = [F.linear(x, w) for w in self.weights]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y + F.linear(F.linear(x, self.a), self.b)


def fused(modules: list, bias: bool = False, adapters: bool = True,
          merge: bool = False) -> tuple[Tensor | AdaptedLinear, Tensor | None]:
    """The weight (and bias, if `bias` and the modules have one) of the projections `modules` fused along their
    outputs, as the lean forward runs them: a plain tensor (torch.cat of the weights, differentiable; with
    adapters and `merge`, each W + s B A merged in, without autograd), or an `AdaptedLinear` (adapters, factored)."""
    bases = [lora_base(m) for m in modules]
    b = torch.cat([m.bias for m in bases]) if bias and bases[0].bias is not None else None
    terms = [adapter_term(m) if adapters else None for m in modules]
    if all(t is None for t in terms):
        w = [m.weight for m in bases]
        return (w[0] if len(w) == 1 else torch.cat(w)), b
    if merge:
        with torch.no_grad():
            merged = [m.weight if t is None else m.weight + t[2] * (t[1] @ t[0]) for m, t in zip(bases, terms)]
        return (merged[0] if len(merged) == 1 else torch.cat(merged)), b
    a = torch.cat([t[0] for t in terms if t is not None])  # (R, in)
    # (out_i, r_i) blocks on the diagonal; a projection without an adapter is an (out_i, 0) block: out_i zero rows
    blocks = [m.weight.new_zeros(m.out_features, 0) if t is None else t[1] * t[2] for m, t in zip(bases, terms)]
    return AdaptedLinear([m.weight for m in bases], b, a, torch.block_diag(*blocks)), None
