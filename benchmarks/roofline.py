"""A roofline of the GRPO step (issue 23, item 1): per phase the FLOPs and bytes counted from the model's shapes,
the arithmetic intensity, the achieved FLOP/s, and this machine's measured GEMM peak for the same shapes, measured
in the same run; a log-log roofline PNG with each phase as a point. docs/performance.md explains how to read it.

    python benchmarks/roofline.py [--only tiny|smol] [--out runs/roofline] [--threads 2] [--steps 5] [--smol-steps 1]

Models: the issue's tiny Llama (benchmarks/setups.py: hidden 128, 4 layers; arithmetic, 8 prompts x 8 samples,
<= 8 new tokens, k3 KL to a reference) and SmolLM2-135M-Instruct (benchmarks/real_model.py: ifeval, 8 prompts x 4
samples, <= 128 new tokens, micro-batches of 8), float32, 2 threads (--threads: on a loaded machine 1 measures
more cleanly, docs/performance.md).

Phases and their times: `RLRun.step`'s own PhaseTimer metrics (time/generate, time/reference, time/update);
generate is split by timing `LeanDecoder.prefill` (wrapped here): prefill = that time, decode = the rest of
time/generate (the decode steps, sampling, the prompts' tokenisation and the responses' detokenisation). Each
step's rollout batch is captured at the reference phase's input and counted (benchmarks/roofline_count.py: the
counting rules; real tokens only). Achieved FLOP/s = counted FLOPs / phase time, summed over the timed steps.

Peaks, measured after the steps in the same process: every distinct GEMM shape (M, K, N) the phases count is timed
as a standalone torch.mm (decode's also through posttrain's prepacked weights, models/packed.py, the faster
kept), best of repeats; a phase's GEMM peak = its GEMM FLOPs / the sum of its GEMMs' times (what its matmuls
would take back to back). Machine lines: the compute roof, a 2048^3 GEMM (or the fastest phase shape timed, if
faster), and the memory bandwidth of a 256 MiB sum (read) and copy (read + write), the larger kept. The tiny step is also profiled (torch.profiler): the share of its time in the
matmul kernels against everything else. Writes roofline.png and roofline.json to --out.

Clocks: every time and peak is taken on two, `wall` (perf_counter, what PhaseTimer measures) and `cpu` (this
process's CPU time / torch threads: the time it ran on a core; exact with --threads 1, with more a thread spinning
at a barrier counts). On a shared machine the wall clock also counts other processes' turns; ratios of numbers of
one clock are what carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import roofline_count as rc

from posttrain.errors import ConfigError

THREADS = 2
PHASES = ("prefill", "decode", "reference", "update")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkl::_mkl_linear",
            "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu")


# ---------------------------------------------------------------- the runs
CLOCKS = ("wall", "cpu")


def now() -> dict[str, float]:
    """wall: perf_counter (what PhaseTimer measures); cpu: this process's CPU time / torch threads, the time it
    ran on a core (on a shared machine the wall clock also counts the time other processes had the cores)."""
    return {"wall": time.perf_counter(), "cpu": time.process_time() / torch.get_num_threads()}


def since(start: dict[str, float]) -> dict[str, float]:
    end = now()
    return {k: end[k] - start[k] for k in CLOCKS}


def dual_timer():
    """posttrain's PhaseTimer (the wall-clock phase metrics RLRun.step fills in), also keeping each phase's CPU
    time (`cpu_seconds`)."""
    from posttrain.train.optim import PhaseTimer

    class DualTimer(PhaseTimer):
        def __init__(self) -> None:
            super().__init__()
            self.cpu_seconds: dict[str, float] = {}

        @contextmanager
        def __call__(self, name: str):
            start = time.process_time()
            try:
                with super().__call__(name):
                    yield
            finally:
                used = (time.process_time() - start) / torch.get_num_threads()
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + used

        def pop_both(self) -> dict[str, dict[str, float]]:
            cpu, self.cpu_seconds = self.cpu_seconds, {}
            return {"wall": {k[5:]: v for k, v in self.pop().items()}, "cpu": cpu}

    return DualTimer()


class Probe:
    """Captures each step's rollout batch (the reference phase's input) and the time spent in LeanDecoder.prefill."""

    def __init__(self, run) -> None:
        self.batch, self.prefill = None, dict.fromkeys(CLOCKS, 0.0)
        reference = run.reference

        def capture(batch, timer):
            self.batch = batch
            return reference(batch, timer)

        run.reference = capture

    @contextmanager
    def timing_prefill(self):
        from posttrain.models.lean import LeanDecoder

        original = LeanDecoder.prefill

        def timed(decoder, *args, **kw):
            start = now()
            try:
                return original(decoder, *args, **kw)
            finally:
                for k, v in since(start).items():
                    self.prefill[k] += v

        LeanDecoder.prefill = timed
        try:
            yield
        finally:
            LeanDecoder.prefill = original


def tiny_run(out: Path):
    import setups

    from posttrain.rl.loop import RLRun

    cfg = setups.run_config(out)
    model = setups.base_model()
    return RLRun.local(cfg, model, setups.tokenizer(), setups.task(cfg)), cfg, model


def smol_run(path: Path, out: Path):
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path / 'config.json'}: no such model directory (make real-model)")
    import real_model

    from posttrain.rl.loop import RLRun
    from posttrain.tasks import build_task, fit_task

    cfg = real_model.run_config(path, out)
    model, tok = real_model.load(path)
    task = build_task(cfg.task, cfg.seed)
    fit_task(task, cfg, model, tok, cfg.rl.prompts_per_step)
    return RLRun.local(cfg, model, tok, task), cfg, model


def measure_steps(run, cfg, model, warmup: int, steps: int) -> dict:
    """Runs warmup + steps GRPO steps; per phase and clock the summed time, and the counted work, of the timed
    steps."""
    from posttrain.models.precision import precision

    shape, probe, timer = rc.ModelShape.of(model), Probe(run), dual_timer()
    times = {c: dict.fromkeys(PHASES, 0.0) for c in CLOCKS}
    works, lengths, step_s = {p: rc.Work() for p in PHASES}, [], {c: [] for c in CLOCKS}
    with probe.timing_prefill():
        for i in range(warmup + steps):
            probe.prefill = dict.fromkeys(CLOCKS, 0.0)
            start = now()
            with precision(cfg.model):
                run.step(timer)
            elapsed, t = since(start), timer.pop_both()
            if i < warmup:
                continue
            for c in CLOCKS:
                step_s[c].append(elapsed[c])
                times[c]["prefill"] += probe.prefill[c]
                times[c]["decode"] += t[c]["generate"] - probe.prefill[c]
                times[c]["reference"] += t[c]["reference"]
                times[c]["update"] += t[c]["update"]
            for name, w in rc.step_work(shape, probe.batch, cfg.rl.micro_batch_size).items():
                works[name].add(w)
            lengths.append(float(probe.batch.response_mask.sum(1).mean()))
    return {"shape": shape, "times": times, "works": works, "steps": steps, "step_s": step_s,
            "response_length": statistics.mean(lengths)}


# ---------------------------------------------------------------- the peaks
def best_time(fn, min_total: float = 0.05, min_reps: int = 3, max_reps: int = 2000) -> dict[str, float]:
    """The fastest of repeated calls on each clock (the machine is shared: the minimum is the least disturbed)."""
    fn()
    best, total, reps = dict.fromkeys(CLOCKS, float("inf")), 0.0, 0
    while reps < min_reps or (total < min_total and reps < max_reps):
        start = now()
        fn()
        t = since(start)
        best = {c: min(best[c], t[c]) for c in CLOCKS}
        total, reps = total + t["wall"], reps + 1
    return best


def gemm_seconds(shapes, packed: bool) -> dict[tuple, dict[str, float]]:
    """(M, K, N) -> seconds per clock of (M, K) @ (K, N) as torch.mm; with `packed`, also through PackedLinear (the
    decode path's prepacked weight), the faster kept."""
    from posttrain.models.packed import PackedLinear, packing_available

    out = {}
    g = torch.Generator().manual_seed(0)
    for M, K, N in sorted(shapes):
        a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        t = best_time(lambda a=a, b=b: torch.mm(a, b))
        if packed and packing_available(torch.float32, torch.device("cpu")):
            lin = PackedLinear(b.t().contiguous(), None, M)
            t2 = best_time(lambda a=a, lin=lin: lin(a))
            t = {c: min(t[c], t2[c]) for c in CLOCKS}
        out[(M, K, N)] = t
    return out


def machine_peaks() -> dict[str, dict[str, float]]:
    """Per clock: a large square GEMM's FLOP/s and the memory bandwidth of a large sum (read) and copy (read +
    write), the larger taken as the roofline's bandwidth."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(64 << 20)  # 256 MiB of float32
    y = torch.empty_like(x)
    gemm, read = best_time(lambda: a @ b), best_time(lambda: x.sum(), min_reps=5)
    copy = best_time(lambda: y.copy_(x), min_reps=5)
    out = {}
    for c in CLOCKS:
        r, w = x.numel() * 4 / read[c], 2 * x.numel() * 4 / copy[c]
        out[c] = {"gemm_2048_flops": 2 * n ** 3 / gemm[c], "read_bytes_s": r, "copy_bytes_s": w,
                  "bandwidth": max(r, w)}
    return out


def phase_tables(m: dict) -> dict[str, list[dict]]:
    """Per clock, a row per phase: time, counted work, intensity, achieved FLOP/s, the GEMM peak of its shapes."""
    decode_shapes = {s for s in m["works"]["decode"].gemms if 0 not in s}
    other = {s for p, w in m["works"].items() if p != "decode" for s in w.gemms if 0 not in s}
    tables = {"decode": gemm_seconds(decode_shapes, packed=True)}
    tables["other"] = gemm_seconds(other, packed=False)
    every = {**tables["decode"], **tables["other"]}
    m["best_gemm_flops"] = {c: max(2 * a * b * n / t[c] for (a, b, n), t in every.items()) for c in CLOCKS}
    out = {}
    for c in CLOCKS:
        rows = []
        for name in PHASES:
            w, t = m["works"][name], m["times"][c][name]
            table = tables["decode" if name == "decode" else "other"]
            gemms = Counter({k: v for k, v in w.gemms.items() if 0 not in k})
            g_flops, g_time = rc.gemm_flops(gemms), sum(table[k][c] * v for k, v in gemms.items())
            achieved = w.flops / t if t > 0 else float("nan")
            peak = g_flops / g_time if g_time > 0 else float("nan")
            rows.append({"phase": name, "seconds_per_step": t / m["steps"],
                         "gflop_per_step": w.flops / m["steps"] / 1e9, "mb_per_step": w.total_bytes / m["steps"] / 1e6,
                         "intensity": w.intensity, "achieved_gflops": achieved / 1e9, "gemm_peak_gflops": peak / 1e9,
                         "of_peak": achieved / peak, "gemm_share_of_flops": g_flops / w.flops if w.flops else 0.0,
                         "gemm_floor_s_per_step": g_time / m["steps"], "distinct_gemm_shapes": len(gemms),
                         "bytes_by_kind_mb": {k: round(v / m["steps"] / 1e6, 3) for k, v in w.bytes.items()}})
        out[c] = rows
    return out


# ---------------------------------------------------------------- the profile of the tiny step
def profile_tiny(run) -> dict:
    """One tiny GRPO step under torch.profiler: the share of self CPU time in matmul kernels, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    from posttrain.train.optim import PhaseTimer

    run.step(PhaseTimer())  # warm
    start = now()
    run.step(PhaseTimer())
    plain = since(start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step(PhaseTimer())
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    calls = sum(e.count for e in events if e.key.startswith(("aten::", "mkl::", "mkldnn::")))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"step_s_unprofiled": plain, "profiled_self_cpu_s": total / 1e6, "gemm_share": gemm / total,
            "op_calls": calls, "us_per_op": {c: plain[c] * 1e6 / max(calls, 1) for c in CLOCKS},
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                         "share": round(e.self_cpu_time_total / total, 3)} for e in top]}


# ---------------------------------------------------------------- the plot
def plot(results: dict, peaks: dict, threads: int, path: Path) -> None:
    """A roofline per model (columns) and clock (rows): the machine's roof, each phase's achieved FLOP/s as a
    point and its GEMM shapes' measured peak as a bar above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = list(results)
    fig, axes = plt.subplots(len(CLOCKS), len(models), figsize=(6.5 * len(models), 6.5 * len(CLOCKS)), squeeze=False)
    for row, clock in enumerate(CLOCKS):
        bw = peaks[clock]["bandwidth"]
        for ax, name in zip(axes[row], models, strict=True):
            rows = results[name]["phases"][clock]
            # the roof: the best GEMM this run measured (the 2048^3 one, or a phase shape when load slowed it)
            peak = max(peaks[clock]["gemm_2048_flops"], results[name]["best_gemm_flops"][clock])
            xs = [r["intensity"] for r in rows]
            lo, hi = min(xs + [peak / bw]) / 4, max(xs + [peak / bw]) * 4
            grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
            ax.loglog(grid, [min(peak, bw * x) for x in grid], "k-", lw=2,
                      label=f"roof: {peak / 1e9:.0f} GFLOP/s (best GEMM measured), {bw / 1e9:.1f} GB/s")
            ax.axvline(peak / bw, color="grey", ls=":", lw=1)
            ax.annotate(f"ridge {peak / bw:.1f} FLOP/B", (peak / bw, peak), textcoords="offset points",
                        xytext=(4, -14), fontsize=8, color="grey")
            for r, color in zip(rows, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True):
                x, y, p = r["intensity"], r["achieved_gflops"] * 1e9, r["gemm_peak_gflops"] * 1e9
                ax.plot([x], [y], "o", color=color, ms=8, label=f"{r['phase']}: {y / 1e9:.2f} GFLOP/s "
                        f"({100 * r['of_peak']:.0f}% of its GEMM peak {p / 1e9:.1f})")
                ax.plot([x], [p], "_", color=color, ms=18, mew=2)
                ax.plot([x, x], [y, p], ":", color=color, lw=1)
                ax.annotate(r["phase"], (x, y), textcoords="offset points", xytext=(6, -10), fontsize=9)
            ax.set_xlabel("arithmetic intensity (FLOP / byte, counted)")
            ax.set_ylabel("FLOP/s")
            ax.set_title(f"{name}: one GRPO step per phase, {threads} thread(s), {clock} clock\n"
                         "point: achieved; bar: its GEMM shapes' measured peak", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(name: str, res: dict) -> None:
    print(f"\n{name}: {res['steps']} timed step(s), mean response length {res['response_length']:.1f}")
    for clock in CLOCKS:
        print(f"  [{clock} clock] step {statistics.median(res['step_s'][clock]):.3f} s (median)")
        print(f"  {'phase':10s} {'s/step':>8s} {'GFLOP':>8s} {'MB':>9s} {'FLOP/B':>7s} {'GFLOP/s':>8s} {'peak':>7s} "
              f"{'of peak':>7s} {'GEMM floor s':>12s}")
        for r in res["phases"][clock]:
            print(f"  {r['phase']:10s} {r['seconds_per_step']:8.4f} {r['gflop_per_step']:8.3f} "
                  f"{r['mb_per_step']:9.1f} {r['intensity']:7.1f} {r['achieved_gflops']:8.2f} "
                  f"{r['gemm_peak_gflops']:7.1f} {100 * r['of_peak']:6.1f}% {r['gemm_floor_s_per_step']:12.4f}")
        tot = res["total"][clock]
        print(f"  counted phases together: {tot['achieved_gflops']:.2f} GFLOP/s against their GEMM peak "
              f"{tot['gemm_peak_gflops']:.1f} GFLOP/s: {100 * tot['of_peak']:.1f}%")
    if "profile" in res:
        pr = res["profile"]
        print(f"  profile: {100 * pr['gemm_share']:.1f}% of self CPU time in matmul kernels; {pr['op_calls']} op "
              f"calls; the unprofiled step {pr['step_s_unprofiled']['wall']:.3f} s wall, "
              f"{pr['step_s_unprofiled']['cpu']:.3f} s cpu: {pr['us_per_op']['cpu']:.1f} us (cpu) per op")
        print("  top ops: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in pr["top_ops"][:8]))


def totals(rows: list[dict]) -> dict:
    """The four counted phases as one: their FLOPs over their time, against their GEMMs' FLOPs over their floor."""
    t = sum(r["seconds_per_step"] for r in rows)
    f = sum(r["gflop_per_step"] for r in rows)
    floor = sum(r["gemm_floor_s_per_step"] for r in rows)
    gf = sum(r["gflop_per_step"] * r["gemm_share_of_flops"] for r in rows)
    return {"seconds_per_step": t, "gflop_per_step": f, "achieved_gflops": f / t, "gemm_peak_gflops": gf / floor,
            "of_peak": (f / t) / (gf / floor)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("tiny", "smol"), default=None, help="one model (default: both; smol only "
                   "when its directory exists)")
    p.add_argument("--out", default=str(HERE.parent / "runs" / "roofline"))
    p.add_argument("--model", default=str(HERE.parent / "models" / "smollm2-135m-instruct"))
    p.add_argument("--steps", type=int, default=5, help="timed tiny steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (the benchmarks' 2 by default)")
    p.add_argument("--smol-steps", type=int, default=1, help="timed SmolLM2 steps (no warm-up: ~1-2 min each)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, model_path = Path(args.out), Path(args.model)
    names = [args.only] if args.only else ["tiny"] + (["smol"] if (model_path / "config.json").is_file() else [])
    if args.only is None and "smol" not in names:
        print(f"{model_path}: no model directory; SmolLM2 skipped (make real-model)")
    results, tmp = {}, Path(tempfile.mkdtemp())
    load = os.getloadavg()
    for name in names:
        run, cfg, model = tiny_run(tmp / name) if name == "tiny" else smol_run(model_path, tmp / name)
        res = measure_steps(run, cfg, model, *((2, args.steps) if name == "tiny" else (0, args.smol_steps)))
        res["phases"] = phase_tables(res)
        res["total"] = {c: totals(res["phases"][c]) for c in CLOCKS}
        if name == "tiny":
            res["profile"] = profile_tiny(run)
        res["shape"] = res["shape"].__dict__
        del res["works"], res["times"]
        results[name] = res
        report(name, res)
    peaks = machine_peaks()
    for c in CLOCKS:
        m = peaks[c]
        print(f"machine [{c} clock]: 2048^3 GEMM {m['gemm_2048_flops'] / 1e9:.1f} GFLOP/s; bandwidth read "
              f"{m['read_bytes_s'] / 1e9:.1f} GB/s, copy {m['copy_bytes_s'] / 1e9:.1f} GB/s; ridge "
              f"{rc.ridge(m['gemm_2048_flops'], m['bandwidth']):.1f} FLOP/B")
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores), "
          f"{args.threads} thread(s)")
    out.mkdir(parents=True, exist_ok=True)
    plot(results, peaks, args.threads, out / "roofline.png")
    (out / "roofline.json").write_text(json.dumps({"machine": peaks, "load_average": load, "threads": args.threads,
                                                   "torch": torch.__version__, "models": results}, indent=2))
    print(f"wrote {out / 'roofline.png'} and {out / 'roofline.json'}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
