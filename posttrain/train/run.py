"""A run's lifecycle below the recipes: seeding and threads, the output directory, the task and model a recipe
starts from, the held-out accuracy before training, and the outputs every command writes at its end
(final/ with its model card, report.png, summary.json)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from posttrain.config import RunConfig, dump_config
from posttrain.models import load_policy, save_pretrained
from posttrain.tasks import build_task, fit_task
from posttrain.train.control import clear_previous_outputs, lock_holder
from posttrain.train.model_card import model_card
from posttrain.train.tracking import held_out, require_trackers


def seed_everything(seed: int, threads: int | str) -> None:
    """Seed Python, NumPy and torch, and fix the thread count (CPU results depend on it; see `free_cores`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(free_cores() if threads == "auto" else int(threads))


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all cores from /proc/stat, or None where there is none (not Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def free_cores(window_s: float = 0.2) -> int:
    """The cores this process may use that nothing else keeps busy: its CPU affinity times the idle share of
    all cores over `window_s` seconds, rounded, at least 1 (threads=auto). A second job on a 2-core laptop
    then gives 1 thread instead of 2 threads that wait for each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    first = _cpu_times()
    if first is None:
        return cores
    time.sleep(window_s)
    second = _cpu_times()
    total = second[1] - first[1]
    if total <= 0:
        return cores
    idle = (second[0] - first[0]) / total
    return max(1, min(cores, round(idle * (os.cpu_count() or cores))))


def prepare_output_dir(cfg: RunConfig) -> Path:
    """Create the output directory and write the fully resolved config into it; a run that starts from the
    beginning first removes the previous run's outputs (recipes/control.py: `clear_previous_outputs`)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(cfg)
    dump_config(cfg, out / "config.yaml")
    return out


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def start_run(cfg: RunConfig, min_train: int = 1, lean_tiny: bool = False):
    """(output dir, task, model, tokenizer) of a run: the trackers' packages checked, the task (deterministic from
    the seed), seeding and threads, the policy on model.device, the task fitted to its tokenizer and context
    (`min_train` training problems at least), then the output directory with config.yaml. lean_tiny: see
    `load_policy` (the tiny model without transformers' modelling code)."""
    require_trackers(cfg.logging.report_to)  # a tracker's missing package: before anything loads
    task = build_task(cfg.task, cfg.seed, cfg.rl.reward_funcs, cfg.rl.reward_weights)
    seed_everything(cfg.seed, cfg.threads)
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed, lean_tiny=lean_tiny)
    fit_task(task, cfg, model, tokenizer, min_train)  # tokenizer covers the prompts; overlong ones dropped
    out = prepare_output_dir(cfg)  # after the user errors above, so that they leave no directory behind
    return out, task, model, tokenizer


def initial_accuracy(cfg: RunConfig, ctl, logger, model, tokenizer, task, phase: str, **record) -> float:
    """Held-out accuracy before training, logged as the phase's step 0 (with `record`); a resumed run reads it
    from its checkpoint. Kept in every checkpoint for the summary."""
    if ctl.resumed is None:
        initial = held_out(cfg, model, tokenizer, task, logger, phase, 0).accuracy
        logger.log({"step": 0, "phase": phase, **record, "accuracy": initial})
    else:
        initial = ctl.resumed.state["initial_accuracy"]
    ctl.extra["initial_accuracy"] = initial
    return initial


def pin_starting_model(cfg: RunConfig, ctl, key: str = "reference_sha256") -> None:
    """Record model.path's content hash in every checkpoint; a resume refuses a changed starting model."""
    if cfg.model.path is not None:
        from posttrain.train.checkpoint import weights_sha256

        ctl.check_frozen(key, weights_sha256(cfg.model.path), f"the starting model {cfg.model.path}")


def dropped_prompts(task) -> dict:
    """{"dropped_prompts": {"training": n, "held-out": m}}: problems `fit_task` dropped as too long for the context."""
    return {"dropped_prompts": dict(getattr(task, "dropped_prompts", {}))}


def write_model_card(cfg: RunConfig, out: Path, method: str, summary: dict, task=None,
                     model_dir: str = "final") -> None:
    """OUTPUT_DIR/`model_dir`/README.md, the model card (train/model_card.py), naming the command line that holds
    the run directory's lock as the one that made it."""
    sizes = {}
    if task is not None and method not in ("dpo", "rm"):  # those two train on preference pairs (in the summary)
        sizes["training problems"] = len(task.train_problems)
    if task is not None and method != "rm":
        sizes["held-out problems"] = len(task.eval_problems)
    path = Path(out) / model_dir / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(model_card(cfg, method, summary, lock_holder(out), sizes), encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(cfg: RunConfig, out, model, tokenizer, summary: dict, start: float, task=None, *,
                  method: str) -> dict:
    """final/ (the model and its card, `method` naming the recipe), report.png and summary.json."""
    save_pretrained(model, tokenizer, out / "final")
    from posttrain.train.report import (
        plot_report,  # matplotlib: imported when a run ends, not at start
    )

    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**summary, **dropped_prompts(task), "seed": cfg.seed,
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_model_card(cfg, out, method, summary, task)
    write_json(out / "summary.json", summary)
    return summary
