"""The matmuls of a SmolLM2 decode step, one library against another (posttrain/models/packed.py).

    python benchmarks/packed.py [--rows 16,64,2048] [--repeats 30] [--backward]

For each of SmolLM2-135M's weight shapes (fused q|k|v, o, fused gate|up, down, the 49k-token head) and each row
count, the median time of y = x W^T in float32 with: `F.linear` on the plain weight (what transformers runs), MKL's
packed sgemm (`torch.ops.mkl._mkl_linear`, the weight packed for that row count), and oneDNN's reordered weight
(`torch.ops.mkldnn._linear_pointwise`), all in one process, 2 threads; with the effective weight-read bandwidth
(bytes of W / time) and the library posttrain's `fp32_backend` chooses on this CPU. Prints a table.

--backward: instead, the two products of a linear layer's backward (dx = g W, dW = g^T x) at the first of
--rows (default here 1,024: a SmolLM2 update micro-batch of 8 x ~130 response tokens) as autograd runs them
(`torch.mm`, MKL) against oneDNN on a reordered W^T (dx) and a reordered x^T (dW), the reorder made per call
included (its time is what a per-step reorder costs), and dx against W^T reordered once (what posttrain's backward
runs inside a `weights_fixed` block: the RL update's micro-batches); dW stays on MKL.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from posttrain.models.packed import _reorder_now, cpu_vendor, fp32_backend, onednn_mm

SHAPES = {"q|k|v": (960, 576), "o": (576, 576), "gate|up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=None, help="row counts (default 16,64,2048; --backward: 1024)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--backward", action="store_true", help="the backward's products instead (at the first of --rows; default 1,024)")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.backward:
        backward(max(3, args.repeats // 6), int((args.rows or "1024").split(",")[0]))
        return
    args.rows = args.rows or "16,64,2048"
    print(f"{cpu_vendor() or platform.processor()}, torch {torch.__version__}, 2 threads; "
          f"posttrain's float32 decode library here: {fp32_backend()}")
    print("| rows | weight | F.linear ms | MKL packed ms | oneDNN ms | MKL / F.linear | oneDNN / F.linear | "
          "F.linear GB/s | oneDNN GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        reps = args.repeats if rows <= 64 else max(3, args.repeats // 6)
        for name, (n, k) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
            mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            dnnl = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            plain = median_ms(lambda x=x, w=w: F.linear(x, w), reps)
            packed = median_ms(lambda x=x, w=w, p=mkl, r=rows: torch.ops.mkl._mkl_linear(x, p, w, None, r), reps)
            onednn = median_ms(lambda x=x, p=dnnl: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                               reps)
            gb = n * k * 4 / 1e9
            print(f"| {rows} | {name} | {plain:.3f} | {packed:.3f} | {onednn:.3f} | {plain / packed:.2f}x | "
                  f"{plain / onednn:.2f}x | {gb / plain * 1e3:.1f} | {gb / onednn * 1e3:.1f} |")


def backward(reps: int, rows: int = 1024) -> None:
    def onednn(a, b_t, n):  # a (M, K) @ b_t^T, b_t (N, K) reordered here for M rows
        return onednn_mm(a, torch.ops.mkldnn._reorder_linear_weight(b_t, n))

    print(f"{cpu_vendor() or platform.processor()}, torch {torch.__version__}, 2 threads; {rows} rows")
    print("| weight | dx MKL ms | dx oneDNN ms | dx MKL / oneDNN | dx oneDNN, W^T kept ms | dx MKL / kept | "
          "dW MKL ms | dW oneDNN ms | dW MKL / oneDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
        g = torch.randn(rows, n, generator=gen)
        torch.testing.assert_close(onednn(g, w.t().contiguous(), rows), g.mm(w), atol=1e-2, rtol=1e-3)
        dx_mkl = median_ms(lambda: g.mm(w), reps)
        dx_dnn = median_ms(lambda: onednn(g, w.t().contiguous(), rows), reps)
        kept = _reorder_now(w, transposed=True)
        torch.testing.assert_close(onednn_mm(g, kept), g.mm(w), atol=1e-2, rtol=1e-3)
        dx_kept = median_ms(lambda: onednn_mm(g, kept), reps)
        dw_mkl = median_ms(lambda: g.t().mm(x), reps)
        dw_dnn = median_ms(lambda: onednn(g.t().contiguous(), x.t().contiguous(), n), reps)
        print(f"| {name} | {dx_mkl:.2f} | {dx_dnn:.2f} | {dx_mkl / dx_dnn:.2f}x | {dx_kept:.2f} | "
              f"{dx_mkl / dx_kept:.2f}x | {dw_mkl:.2f} | {dw_dnn:.2f} | {dw_mkl / dw_dnn:.2f}x |")


if __name__ == "__main__":
    main()
