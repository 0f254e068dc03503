"""Linear layers with their weights prepacked for CPU decoding: the same products, computed faster.

A decode step multiplies a few rows (the batch, one token each) by every weight matrix of the model. With so few
rows the matmul is bound by reading the weights, and MKL's sgemm on a plain row-major weight (what `F.linear`
runs in float32) reads them well below the memory bandwidth. Packing the weight once into a GEMM library's own
blocked layout (the ops `torch.ops.mkl._mkl_linear` and `torch.ops.mkldnn._linear_pointwise` that inductor's CPU
freezing pass uses) makes these matmuls faster. Which library packs float32 is chosen once per process by the CPU
(`fp32_backend`), never by timing, so a run's numbers do not depend on which kernel won a race:

- **mkl** on Intel CPUs: MKL's `cblas_sgemm_pack`, bit-identical to `F.linear` at the packed row count; measured
  1.4-2.5x on the project's 2-core Xeon at batch 16 (benchmarks/packed.py). Fewer rows are zero-padded up to the
  packed count, more fall back to `F.linear`.
- **onednn** on other CPUs (AMD): MKL takes a slower generic path there (on the project's AMD EPYC its packed
  sgemm was 0.6-1.4x of `F.linear`, and `F.linear` reads SmolLM2's head at 5.7 GB/s at 16 rows), while oneDNN's
  reordered weight runs 1.3-3.1x faster than `F.linear` at 16-64 rows and 1.2-1.6x at 2,048 (prefill). The
  results equal `F.linear`'s to float rounding (|diff| ~1e-6 relative: another summation order), and are the
  same for any row count with the same reordered weight, so rows are never padded and prompts of any length
  use it too.

bfloat16 always uses oneDNN's reorder. A packed weight is a snapshot: the decoder packs when a generation starts
(the weights of that call), and (mkl) repacks when the batch shrinks to half of the rows it was packed for.
POSTTRAIN_PACK in the environment: `0` switches packing off (the plain `F.linear` then runs, as on other
devices); `mkl` or `onednn` forces the float32 library; unset or `1` chooses by the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (`GenuineIntel`, `AuthenticAMD`, ...) from /proc/cpuinfo; '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _has_mkl() -> bool:
    return torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_linear")


def _has_onednn(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fp32_backend() -> str | None:
    """'mkl' | 'onednn' | None (no packing): the library that packs float32 weights in this process."""
    choice = os.environ.get("POSTTRAIN_PACK", "1")
    if choice == "0":
        return None
    if choice not in ("1", "mkl", "onednn"):
        raise ValueError(f"POSTTRAIN_PACK={choice!r}: expected 0, 1, mkl or onednn")
    if choice == "1":
        choice = "mkl" if cpu_vendor() == "GenuineIntel" or not _has_onednn(torch.float32) else "onednn"
    available = _has_mkl() if choice == "mkl" else _has_onednn(torch.float32)
    return choice if available else None


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of `dtype` on `device` can be prepacked here (a CPU build with MKL / oneDNN)."""
    if device.type != "cpu" or os.environ.get("POSTTRAIN_PACK", "1") == "0":  # (bf16 follows the switch too)
        return False
    if dtype == torch.float32:
        return fp32_backend() is not None
    if dtype == torch.bfloat16:
        return _has_onednn(torch.bfloat16)
    return False


# float32 weights smaller than this stay plain on the onednn backend: on the project's AMD EPYC at 64 rows oneDNN
# took 25 us where F.linear took 16 for a tiny Llama's 128 x 128 (and 100 x 128 head), while from 1024 x 128 on
# it was faster (benchmarks/packed.py covers SmolLM2's shapes, all above it).
ONEDNN_MIN_WEIGHT = 1 << 17


class PackedLinear:
    """y = x W^T + b for inputs of any number of rows (all leading dimensions flattened), W (N, K) packed for
    `rows` of them. mkl: fewer rows are zero-padded to `rows`, more fall back to F.linear on the plain weight;
    onednn: any row count runs on the reordered weight as it is."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        self.weight, self.bias, self.rows = weight.detach(), None if bias is None else bias.detach(), rows
        self.backend = fp32_backend() if self.weight.dtype == torch.float32 else "onednn"
        if self.backend == "onednn" and self.weight.dtype == torch.float32 and self.weight.numel() < ONEDNN_MIN_WEIGHT:
            self.backend, self.packed = "plain", None  # a small weight: oneDNN's fixed cost loses to F.linear
            return
        if self.backend == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def repack(self, rows: int) -> PackedLinear:
        """Packed for `rows` (mkl); onednn's reordered weight serves every row count, so it is kept."""
        return self if self.backend in ("onednn", "plain") else PackedLinear(self.weight, self.bias, rows)

    def __call__(self, x: Tensor) -> Tensor:
        lead, K = x.shape[:-1], x.size(-1)
        x2 = x.reshape(-1, K).to(self.weight.dtype)
        n = x2.size(0)
        if self.backend == "plain":
            return F.linear(x2, self.weight, self.bias).view(*lead, -1)
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "").view(*lead, -1)
        if n > self.rows:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if n < self.rows:
            x2 = torch.cat([x2, x2.new_zeros(self.rows - n, K)])
        y = torch.ops.mkl._mkl_linear(x2, self.packed, self.weight, self.bias, self.rows)
        return y[:n].view(*lead, -1)


def linear(x: Tensor, weight, bias: Tensor | None = None, reordered: Tensor | None = None) -> Tensor:
    """F.linear, or a callable weight that holds its own bias (a PackedLinear, lean_lora's AdaptedLinear). A large
    float32 CPU product outside autocast runs its forward on oneDNN where `fp32_backend` chose it (`_OnednnLinear`),
    on `reordered` (`training_reorder(weight)`, taken by a caller that multiplies the same weight many times) or on
    a reorder made for this call."""
    if not isinstance(weight, Tensor):
        return weight(x)
    if x.dtype == weight.dtype and _trains_on_onednn(weight) and x.numel() * weight.size(0) >= TRAIN_ONEDNN_MACS:
        return _OnednnLinear.apply(x, weight, bias, _reorder(weight) if reordered is None else reordered)
    return F.linear(x, weight, bias)


# The training and reference forward (many rows) on oneDNN where the decode path uses it: on the project's AMD EPYC
# 1.1-1.5x F.linear's forward at 2,048 rows of SmolLM2's shapes (benchmarks/packed.py). Products below this many
# multiply-adds (rows x K x N) keep F.linear: oneDNN's fixed cost loses there (a tiny Llama's 64 x 128 x 128).
TRAIN_ONEDNN_MACS = 1 << 24
_TRAIN_ONEDNN = os.environ.get("POSTTRAIN_PACK", "1") in ("1", "onednn") and fp32_backend() == "onednn"


def _reorder(weight: Tensor, transposed: bool = False) -> Tensor:
    """oneDNN's reordered copy of `weight` (of its transpose W^T, (K, N), for the products x W of a backward pass);
    inside `weights_fixed()` made once per weight and reused."""
    fixed = fixed_store()
    if fixed is None:
        return _reorder_now(weight.detach(), transposed)
    key = (id(weight), transposed)
    held = fixed.get(key)
    if held is None or held[0] is not weight or held[1] != (weight.data_ptr(), weight._version):
        held = fixed[key] = (weight, (weight.data_ptr(), weight._version), _reorder_now(weight.detach(), transposed))
    return held[2]


def _reorder_now(weight: Tensor, transposed: bool = False) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous() if transposed else weight, 2048)


def onednn_mm(x: Tensor, reordered: Tensor) -> Tensor:
    """(M, K) x -> (M, N) x W^T for W (N, K) as `_reorder` gave it (for W^T reordered: x W, the backward's dx)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), reordered, None, "none", [], "")


_FIXED = threading.local()  # .cache: id(weight) -> (weight, (data_ptr, _version), reordered), this thread's block


@contextlib.contextmanager
def weights_fixed():
    """A block in which no weight changes (no optimizer step, no load): each weight the training path multiplies
    on oneDNN is reordered once in it, not once per call (and the lean forward fuses q|k|v and gate|up once,
    `fixed_store`). The reference pass over a batch's micro-batches and the gradient accumulation of one
    minibatch call every linear layer once per micro-batch; without this each call reorders its weight again
    (SmolLM2 at 4 micro-batches: 3.5 s of a 79 s GRPO step). The copies are dropped when the outermost block
    ends; the block holds for the thread that entered it. A weight changed in place inside the block is caught
    only where it bumps `_version` (fused AdamW does not), so an optimizer step must not run inside one."""
    outer = fixed_store()
    if outer is None:
        _FIXED.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _FIXED.cache = None


def fixed_store() -> dict | None:
    """This thread's `weights_fixed` block's store (None outside one), also for other values made from weights
    that the block reuses (models/lean.py: the fused q|k|v and gate|up weights, so that their reorders are too)."""
    return getattr(_FIXED, "cache", None)


def training_reorder(weight: Tensor, transposed: bool = False) -> Tensor | None:
    """oneDNN's reordered copy of `weight` as it is now, for a caller that multiplies it many times between two
    changes (the chunked log-probs: a 49k head reordered once per call, not once per chunk, which would cost about
    a 170-token chunk's product), or None where `linear` would not use oneDNN for it. A snapshot: the caller
    must not keep it past a change of the weight (an optimizer step; fused AdamW does not even bump `_version`).
    transposed: the copy of W^T, for dx = dy W."""
    return _reorder(weight, transposed) if _trains_on_onednn(weight) else None


def backward_reorder(weight: Tensor, rows: int) -> Tensor | None:
    """oneDNN's reordered W^T for dx = dy W over `rows` rows, where `linear` would run that product on oneDNN (the
    same size threshold, TRAIN_ONEDNN_MACS), else None (the caller keeps torch.mm). A snapshot, as
    `training_reorder`'s."""
    if rows * weight.numel() < TRAIN_ONEDNN_MACS:
        return None
    return training_reorder(weight, transposed=True)


def _trains_on_onednn(weight: Tensor) -> bool:
    """Whether the training path runs products with `weight` on oneDNN: float32 on the CPU, outside autocast
    (whose bf16 F.linear is left to it), where `fp32_backend` chose oneDNN."""
    return (_TRAIN_ONEDNN and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


class _OnednnLinear(torch.autograd.Function):
    """y = x W^T + b with the forward on oneDNN's reordered W (`reordered`, the same values) and the backward
    F.linear's: dx = dy W, dW = dy^T x, db = sum dy. x (..., K), W (N, K), b (N,). dW and db as autograd computes
    them for F.linear (MKL); dx too, except inside a `weights_fixed` block (the RL update's micro-batches), where
    it runs on oneDNN against W^T reordered once per block: on the project's Zen 4 EPYC 205-220 GFLOP/s against
    MKL's 155-199 at 800-1,600 rows of SmolLM2's shapes (docs/performance.md, "The backward's dx on oneDNN")."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, reordered: Tensor) -> Tensor:
        lead, K = x.shape[:-1], x.size(-1)
        x2 = x.reshape(-1, K)
        ctx.save_for_backward(x2, weight)
        ctx.lead, ctx.has_bias = lead, bias is not None
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), reordered, bias, "none", [], "").view(*lead, -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.size(0))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g.mm(weight) if fixed_store() is None else onednn_mm(g, _reorder(weight, transposed=True))
            dx = dx.view(*ctx.lead, -1)
        dw = g.t().mm(x2) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None
