"""Linear layers with their weights prepacked for CPU decoding: the same products, computed faster.

A decode step multiplies a few rows (the batch, one token each) by every weight matrix of the model. With so few
rows the matmul is bound by reading the weights, and MKL's sgemm on a plain row-major weight reads them well below
the memory bandwidth (measured on this project's 2-core Xeon at batch 16: 6-7 GB/s against 17 GB/s for a plain sum
over the same bytes). Packing the weight once into the GEMM library's own blocked layout for a known number of rows
(MKL's `cblas_sgemm_pack` for float32, oneDNN's reorder for bfloat16: the ops `torch.ops.mkl._mkl_linear` and
`torch.ops.mkldnn._linear_pointwise` that inductor's CPU freezing pass uses) makes these matmuls 1.4-2.5x faster
with bit-identical results (benchmarks/real_model.py, tests/models/test_packed.py).

A packed weight is a snapshot: the decoder packs when a generation starts (the weights of that call), and repacks
when the batch shrinks to half of the rows it was packed for (finished rows leave the batch); in between, fewer
rows are zero-padded up to the packed count, which costs little in a matmul that is bound by weight reads.
POSTTRAIN_PACK=0 in the environment switches packing off (the plain `F.linear` then runs, as on other devices).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of `dtype` on `device` can be prepacked here (a CPU build with MKL / oneDNN)."""
    if device.type != "cpu" or os.environ.get("POSTTRAIN_PACK", "1") == "0":
        return False
    if dtype == torch.float32:
        return torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_linear")
    if dtype == torch.bfloat16:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class PackedLinear:
    """y = x W^T + b for inputs of up to `rows` rows (all leading dimensions flattened), W (N, K) packed for
    exactly `rows`; fewer rows are zero-padded to `rows`, more fall back to F.linear on the plain weight."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        self.weight, self.bias, self.rows = weight.detach(), None if bias is None else bias.detach(), rows
        if self.weight.dtype == torch.float32:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def repack(self, rows: int) -> PackedLinear:
        return PackedLinear(self.weight, self.bias, rows)

    def __call__(self, x: Tensor) -> Tensor:
        lead, K = x.shape[:-1], x.size(-1)
        x2 = x.reshape(-1, K).to(self.weight.dtype)
        n = x2.size(0)
        if n > self.rows:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if n < self.rows:
            x2 = torch.cat([x2, x2.new_zeros(self.rows - n, K)])
        if self.weight.dtype == torch.float32:
            y = torch.ops.mkl._mkl_linear(x2, self.packed, self.weight, self.bias, self.rows)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y[:n].view(*lead, -1)


def linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """F.linear, or a callable weight that holds its own bias (a PackedLinear, lean_lora's AdaptedLinear)."""
    if not isinstance(weight, Tensor):
        return weight(x)
    return F.linear(x, weight, bias)
