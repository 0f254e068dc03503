"""The matmuls of a SmolLM2 decode step, one library against another (posttrain/models/packed.py).

    python benchmarks/packed.py [--rows 16,64,2048] [--repeats 30]

For each of SmolLM2-135M's weight shapes (fused q|k|v, o, fused gate|up, down, the 49k-token head) and each row
count, the median time of y = x W^T in float32 with: `F.linear` on the plain weight (what transformers runs), MKL's
packed sgemm (`torch.ops.mkl._mkl_linear`, the weight packed for that row count), and oneDNN's reordered weight
(`torch.ops.mkldnn._linear_pointwise`), all in one process, 2 threads; with the effective weight-read bandwidth
(bytes of W / time) and the library posttrain's `fp32_backend` chooses on this CPU. Prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from posttrain.models.packed import cpu_vendor, fp32_backend

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
    p.add_argument("--rows", default="16,64,2048")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(2)
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


if __name__ == "__main__":
    main()
