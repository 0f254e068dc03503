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
from posttrain.tasks import build_task, fit_task


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _start(cfg: RunConfig, min_train: int = 1):
    task = build_task(cfg.task, cfg.seed)
    seed_everything(cfg.seed, cfg.threads)
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed)
    fit_task(task, cfg, model, tokenizer, min_train)  # tokenizer covers the prompts; overlong ones dropped
    out = prepare_output_dir(cfg)  # after the user errors above, so that they leave no directory behind
    return out, task, model, tokenizer


def initial_accuracy(cfg: RunConfig, ctl, logger, model, tokenizer, task, phase: str, **record) -> float:
    """Held-out accuracy before training, logged as the phase's step 0 (with `record`); a resumed run reads it
    from its checkpoint. Kept in every checkpoint for the summary."""
    if ctl.resumed is None:
        initial = evaluate(model, tokenizer, task, task.eval_problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
        logger.log({"step": 0, "phase": phase, **record, "accuracy": initial})
    else:
        initial = ctl.resumed.state["initial_accuracy"]
    ctl.extra["initial_accuracy"] = initial
    return initial


def pin_starting_model(cfg: RunConfig, ctl, key: str = "reference_sha256") -> None:
    """Record model.path's content hash in every checkpoint; a resume refuses a changed starting model."""
    if cfg.model.path is not None:
        from posttrain.checkpoint import weights_sha256

        ctl.check_frozen(key, weights_sha256(cfg.model.path), f"the starting model {cfg.model.path}")


def dropped_prompts(task) -> dict:
    """{"dropped_prompts": {"training": n, "held-out": m}}: problems `fit_task` dropped as too long for the context."""
    return {"dropped_prompts": dict(getattr(task, "dropped_prompts", {}))}


def _finish(cfg: RunConfig, out, model, tokenizer, summary: dict, start: float, task=None) -> dict:
    save_pretrained(model, tokenizer, out / "final")
    from posttrain.report import plot_report  # matplotlib: imported when a run ends, not at start

    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**summary, **dropped_prompts(task), "seed": cfg.seed,
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    return summary


def run_sft(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Supervised fine-tuning on the task's demonstrations (resume: from the newest valid checkpoint)."""
    from posttrain.recipes.control import RunControl, finish_run, metrics_logger, open_run
    from posttrain.recipes.sft import setup_sft, train_sft

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = _start(cfg)
    with metrics_logger(out, resumed) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        state = setup_sft(cfg, model, tokenizer, task)
        with progress_bar(cfg.sft.steps, "SFT", cfg.progress) as bar:
            accuracy = train_sft(cfg, state, logger, bar, ctl)
    summary = _finish(cfg, out, model, tokenizer,
                      {"sft_accuracy": accuracy, "eval_problems": len(task.eval_problems)}, start, task)
    finish_run(out)  # after final/ is written: a crash before this point resumes at the last step
    print(f"SFT held-out accuracy {accuracy:.3f} on {len(task.eval_problems)} problems; model in {out / 'final'}")
    return summary


def run_rl(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Online RL from `model.path` (typically an SFT checkpoint) with the configured algorithm (resume: from
    the newest valid checkpoint; the starting model, which is also the reference, must be unchanged)."""
    if cfg.backend == "ray":  # the same loop with its roles as Ray actors (posttrain/distributed)
        from posttrain.distributed.loop import run_rl_ray

        return run_rl_ray(cfg, resume, overwrite)
    from posttrain.recipes.control import RunControl, finish_run, metrics_logger, open_run
    from posttrain.recipes.rl import setup_rl, train_rl

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = _start(cfg, min_train=cfg.rl.prompts_per_step)
    if cfg.model.path is None:
        print("note: model.path is not set, so RL starts from a randomly initialised tiny model")
    with metrics_logger(out, resumed) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        initial = initial_accuracy(cfg, ctl, logger, model, tokenizer, task, "rl")
        pin_starting_model(cfg, ctl)
        state = setup_rl(cfg, model, tokenizer, task)
        with progress_bar(cfg.rl.steps, (cfg.rl.preset or cfg.rl.advantage).upper(), cfg.progress) as bar:
            accuracy = train_rl(cfg, state, logger, bar, ctl)
    summary = _finish(cfg, out, model, tokenizer, {"initial_accuracy": initial, "rl_accuracy": accuracy,
                                                   "eval_problems": len(task.eval_problems)}, start, task)
    finish_run(out)
    print(f"RL held-out accuracy {initial:.3f} -> {accuracy:.3f} on {len(task.eval_problems)} problems; "
          f"model in {out / 'final'}")
    return summary


def run_rm(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Reward model (Bradley-Terry) from `model.path` (typically the SFT model) on `rm.data` pairs (resume:
    from the newest valid checkpoint; the starting model, which also samples synthetic pairs, must be unchanged)."""
    from posttrain.models.reward import RewardModel
    from posttrain.models.value import build_scalar_model
    from posttrain.recipes.control import RunControl, finish_run, metrics_logger, open_run
    from posttrain.recipes.reward_model import load_pairs, setup_rm, train_rm

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, policy, tokenizer = _start(cfg)
    train_pairs, eval_pairs = load_pairs(cfg, task, policy, tokenizer)
    print(f"reward model: {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    rm = RewardModel(build_scalar_model(cfg.model, tokenizer, cfg.seed), tokenizer, cfg.rm.max_length)
    del policy
    with metrics_logger(out, resumed) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        pin_starting_model(cfg, ctl, "start_sha256")
        state = setup_rm(cfg, rm, train_pairs, eval_pairs)
        with progress_bar(cfg.rm.steps, "RM", cfg.progress) as bar:
            result = train_rm(cfg, state, logger, bar, ctl)
    rm.save(out / "final")
    from posttrain.report import plot_report  # matplotlib: imported when a run ends, not at start

    plot_report(out / "metrics.jsonl", out / "report.png")
    summary = {**result, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), **dropped_prompts(task),
               "seed": cfg.seed,
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    finish_run(out)
    print(f"reward model held-out accuracy {result['eval_accuracy']:.3f}, mean margin {result['eval_margin']:.3f} "
          f"on {len(eval_pairs)} pairs; model in {out / 'final'}")
    return summary


def run_dpo(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """DPO (or IPO, SLiC-HF, SimPO: `dpo.loss`) from `model.path` (typically the SFT model) on `dpo.data` pairs
    (resume: from the newest valid checkpoint; the starting model, which is also the reference, must be unchanged)."""
    from posttrain.recipes.common import evaluate_per_problem
    from posttrain.recipes.control import RunControl, finish_run, metrics_logger, open_run
    from posttrain.recipes.dpo import load_dpo_pairs, setup_dpo, train_dpo
    from posttrain.recipes.pipeline import confidence_interval

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = _start(cfg)
    if cfg.model.path is None:
        print("note: model.path is not set, so DPO starts from a randomly initialised tiny model")
    train_pairs, eval_pairs = load_dpo_pairs(cfg, task, model, tokenizer)
    print(f"{cfg.dpo.loss}: {len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    with metrics_logger(out, resumed) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        if resumed is None:
            before = evaluate_per_problem(model, tokenizer, task, task.eval_problems, cfg.eval.batch_size,
                                          cfg.eval.max_new_tokens)
            logger.log({"step": 0, "phase": "dpo", "accuracy": sum(before) / len(before)})
        else:
            before = list(resumed.state["initial_gold"])
        initial = sum(before) / len(before)
        ctl.extra["initial_gold"] = before
        pin_starting_model(cfg, ctl)
        state = setup_dpo(cfg, model, tokenizer, task, train_pairs, eval_pairs)  # reference log-probs: before restore
        with progress_bar(cfg.dpo.steps, cfg.dpo.loss.upper(), cfg.progress) as bar:
            result = train_dpo(cfg, state, logger, bar, ctl)
    mean, lo, hi = confidence_interval(before, result["gold"])
    loss = state.loss
    summary = _finish(cfg, out, model, tokenizer, {
        "initial_accuracy": initial, "dpo_accuracy": result["accuracy"], "improvement": mean,
        "improvement_ci95": [lo, hi], "eval_problems": len(before), "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs), **{k: v for k, v in result.items() if k.startswith("eval_")},
        "loss": loss.name, "beta": loss.beta, "margin": loss.margin, "reference": loss.use_reference,
        "length_normalize": loss.length_normalize, "sft_coef": loss.sft_coef}, start, task)
    finish_run(out)
    print(f"{loss.name} held-out accuracy {initial:.3f} -> {result['accuracy']:.3f} ({mean:+.3f}, 95% CI "
          f"{lo:+.3f} .. {hi:+.3f}) on {len(before)} problems; held-out pair accuracy "
          f"{result.get('eval_accuracy', float('nan')):.3f}; model in {out / 'final'}")
    return summary


def run_bon(cfg: RunConfig) -> dict:
    """Best-of-n on the task's held-out problems with `model.path` and `bon.scorer`: table, plot, best.jsonl."""
    import json

    from posttrain.errors import ConfigError
    from posttrain.recipes.best_of_n import best_of_n, best_rows, build_scorer, format_table
    from posttrain.report_offline import plot_best_of_n

    if cfg.model.path is None:
        raise ConfigError("best-of-n needs a trained model: pass --model DIR (model.path)")
    start = time.perf_counter()
    out, task, model, tokenizer = _start(cfg)
    c = cfg.bon
    scorer = build_scorer(c.scorer, task)
    problems = task.eval_problems[:c.num_prompts]
    greedy = evaluate(model, tokenizer, task, problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    with progress_bar(len(problems), f"best-of-{c.n}", cfg.progress) as bar:
        result = best_of_n(cfg, model, tokenizer, task, problems, scorer, bar)
    with MetricsLogger(out / "metrics.jsonl") as logger:
        for row in result.table:
            logger.log({"step": row["n"], "phase": "bon", **row})
        logger.log({"step": c.n, "phase": "bon", "greedy_accuracy": greedy, **result.seconds})
    with open(out / "best.jsonl", "w", encoding="utf-8") as f:
        for row in best_rows(problems, result):
            f.write(json.dumps(row) + "\n")
    plot_best_of_n(result.table, out / "bon.png", f"best-of-n: {cfg.model.path}, {len(problems)} held-out "
                   f"problems, temperature {c.temperature} (seed {cfg.seed})", scorer=c.scorer, greedy=greedy)
    summary = {"table": result.table, "greedy_accuracy": greedy, "eval_problems": len(problems), "n": c.n,
               "scorer": c.scorer,
               "model": cfg.model.path, "seed": cfg.seed, **{k.replace("time/", "") + "_seconds": round(v, 1)
                                                              for k, v in result.seconds.items()},
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    print(format_table(result.table))
    print(f"best-of-n on {len(problems)} held-out problems, scorer {c.scorer} (greedy accuracy {greedy:.4f}); "
          f"table and plot in {out}")
    return summary


def run_rft(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Rejection-sampling fine-tuning from `model.path` (typically the SFT model) for `rft.rounds` rounds
    (resume: from the newest valid checkpoint, saved at every round's end and on the SFT-step cadence)."""
    from posttrain.recipes.control import RunControl, finish_run, metrics_logger, open_run
    from posttrain.recipes.rft import setup_rft, train_rft

    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = _start(cfg)
    if cfg.model.path is None:
        print("note: model.path is not set, so RFT starts from a randomly initialised tiny model")
    c = cfg.rft
    with metrics_logger(out, resumed) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        state = setup_rft(cfg, model, tokenizer, task)
        initial = initial_accuracy(cfg, ctl, logger, model, tokenizer, task, "rft", round=0)
        with progress_bar(c.rounds * c.steps, "RFT", cfg.progress) as bar:
            result = train_rft(cfg, state, logger, bar, ctl)
    summary = _finish(cfg, out, model, tokenizer, {"initial_accuracy": initial, "rft_accuracy":
                                                   result["round_accuracies"][-1], **result,
                                                   "eval_problems": len(task.eval_problems)}, start, task)
    finish_run(out)
    rounds = " -> ".join(f"{a:.3f}" for a in [initial, *result["round_accuracies"]])
    print(f"RFT held-out accuracy by round {rounds} on {len(task.eval_problems)} problems (kept "
          f"{', '.join(map(str, result['kept']))}); model in {out / 'final'}")
    return summary
