"""`posttrain sft|rm|rl CONFIG`: one recipe each, writing a run directory.

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


def run_rm(cfg: RunConfig) -> dict:
    """Reward model (Bradley-Terry) from `model.path` (typically the SFT model) on `rm.data` pairs."""
    from posttrain.models.reward import RewardModel
    from posttrain.models.value import build_scalar_model
    from posttrain.recipes.reward_model import load_pairs, setup_rm, train_rm

    start = time.perf_counter()
    out, task, policy, tokenizer = _start(cfg)
    train_pairs, eval_pairs = load_pairs(cfg, task, policy, tokenizer)
    print(f"reward model: {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    rm = RewardModel(build_scalar_model(cfg.model, tokenizer, cfg.seed), tokenizer, cfg.rm.max_length)
    del policy
    with MetricsLogger(out / "metrics.jsonl") as logger:
        state = setup_rm(cfg, rm, train_pairs, eval_pairs)
        with progress_bar(cfg.rm.steps, "RM", cfg.progress) as bar:
            result = train_rm(cfg, state, logger, bar)
    rm.save(out / "final")
    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**result, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "seed": cfg.seed,
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    print(f"reward model held-out accuracy {result['eval_accuracy']:.3f}, mean margin {result['eval_margin']:.3f} "
          f"on {len(eval_pairs)} pairs; model in {out / 'final'}")
    return summary
