"""`posttrain sft CONFIG` and `posttrain rl CONFIG`: one recipe each, writing a run directory.

The directory holds config.yaml, metrics.jsonl, final/ (safetensors + tokenizer, loadable with the HF
Auto classes), report.png and summary.json.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from posttrain.config import RunConfig
from posttrain.logging import MetricsLogger
from posttrain.models import load_policy, save_pretrained
from posttrain.recipes.common import evaluate, prepare_output_dir, seed_everything, write_json
from posttrain.report import plot_report
from posttrain.tasks import build_task


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _start(cfg: RunConfig):
    out = prepare_output_dir(cfg)
    seed_everything(cfg.seed, cfg.threads)
    task = build_task(cfg.task, cfg.seed)
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
    return out, task, model, tokenizer


def _finish(cfg: RunConfig, out, model, tokenizer, summary: dict, start: float) -> dict:
    save_pretrained(model, tokenizer, out / "final")
    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**summary, "seed": cfg.seed, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    return summary


def run_sft(cfg: RunConfig) -> dict:
    """Supervised fine-tuning on the task's demonstrations."""
    from posttrain.recipes.sft import setup_sft, train_sft

    start = time.perf_counter()
    out, task, model, tokenizer = _start(cfg)
    with MetricsLogger(out / "metrics.jsonl") as logger:
        state = setup_sft(cfg, model, tokenizer, task)
        with progress_bar(cfg.sft.steps, "SFT", cfg.progress) as bar:
            accuracy = train_sft(cfg, state, logger, bar)
    summary = _finish(cfg, out, model, tokenizer,
                      {"sft_accuracy": accuracy, "eval_problems": len(task.eval_problems)}, start)
    print(f"SFT held-out accuracy {accuracy:.3f} on {len(task.eval_problems)} problems; model in {out / 'final'}")
    return summary


def run_rl(cfg: RunConfig) -> dict:
    """Online RL from `model.path` (typically an SFT checkpoint) with the configured algorithm."""
    from posttrain.recipes.rl import setup_rl, train_rl

    start = time.perf_counter()
    out, task, model, tokenizer = _start(cfg)
    if cfg.model.path is None:
        print("note: model.path is not set, so RL starts from a randomly initialised tiny model")
    with MetricsLogger(out / "metrics.jsonl") as logger:
        initial = evaluate(model, tokenizer, task, task.eval_problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
        logger.log({"step": 0, "phase": "rl", "accuracy": initial})
        state = setup_rl(cfg, model, tokenizer, task)
        with progress_bar(cfg.rl.steps, cfg.rl.advantage.upper(), cfg.progress) as bar:
            accuracy = train_rl(cfg, state, logger, bar)
    summary = _finish(cfg, out, model, tokenizer, {"initial_accuracy": initial, "rl_accuracy": accuracy,
                                                   "eval_problems": len(task.eval_problems)}, start)
    print(f"RL held-out accuracy {initial:.3f} -> {accuracy:.3f} on {len(task.eval_problems)} problems; "
          f"model in {out / 'final'}")
    return summary
