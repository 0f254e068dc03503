"""The embedded default run: build the tiny model, SFT on (imperfect) demonstrations, evaluate, GRPO with
the exact-match verifier, evaluate again, and write config, metrics, checkpoints, a report and a summary.

Nothing SFT's first step does not need is imported before it (docs/performance.md, "Start-up"): SFT trains the
tiny model as TinyLlamaForCausalLM (posttrain/models/tiny.py: transformers' weights bit for bit, without its
modelling code), GRPO's modules (posttrain.rl, whose reward model and critic import that code) are imported when
SFT ends, where GRPO gets transformers' LlamaForCausalLM holding the same parameters, and matplotlib at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain.config import RunConfig
from posttrain.models import save_pretrained
from posttrain.models.adapters import refuse_peft as _no_peft
from posttrain.models.tiny import transformers_model
from posttrain.recipes.sft import setup_sft, train_sft
from posttrain.train.checkpoint import load_weights_into, weights_sha256
from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run
from posttrain.train.metrics import read_metrics
from posttrain.train.run import dropped_prompts, progress_bar, start_run, write_json, write_model_card


def run_demo(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """SFT then GRPO on the built-in task; returns the summary (also written to summary.json).

    resume: continue from the run directory's newest valid checkpoint (in SFT or in RL); see `open_run`.
    """
    _no_peft(cfg.model, "demo", "its SFT and GRPO phases hand full weights to each other")
    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg, min_train=cfg.rl.prompts_per_step, lean_tiny=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"posttrain demo: {n_params / 1e6:.2f}M-parameter model, task {task.name} "
          f"({len(task.train_problems)} train / {len(task.eval_problems)} held-out problems), output {out}")
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        if ctl.resume_step("rl") is None:
            sft_state = setup_sft(cfg, model, tokenizer, task)
            with progress_bar(cfg.sft.steps, "SFT ", cfg.progress) as bar:
                sft_accuracy = train_sft(cfg, sft_state, logger, bar, ctl)
            save_pretrained(model, tokenizer, out / "sft")
            sft_seconds = time.perf_counter() - start
        else:  # resuming inside RL: the SFT model (the reference) is the one saved when SFT ended
            load_weights_into(model, out / "sft")
            sft_accuracy, sft_seconds = resumed.state["sft_accuracy"], resumed.state["sft_seconds"]
        model = transformers_model(model)  # the same parameters, now in transformers' LlamaForCausalLM
        from posttrain.rl.loop import train_rl  # after SFT: see the module docstring
        from posttrain.rl.roles import InlineRoles

        ctl.check_frozen("reference_sha256", weights_sha256(out / "sft"), f"the reference model {out / 'sft'}")
        ctl.extra.update(sft_accuracy=sft_accuracy, sft_seconds=sft_seconds)
        roles = InlineRoles.local(cfg, model, tokenizer, task)
        with progress_bar(cfg.rl.steps, "GRPO", cfg.progress) as bar:
            rl_accuracy = train_rl(cfg, roles, task, logger, bar, ctl)
        save_pretrained(model, tokenizer, out / "final")
    from posttrain.train.report import plot_report, summarize_table

    plot_report(out / "metrics.jsonl", out / "report.png", title=f"posttrain demo (seed {cfg.seed})")
    summary = {"sft_accuracy": sft_accuracy, "rl_accuracy": rl_accuracy,
               "improvement": round(rl_accuracy - sft_accuracy, 6), "eval_problems": len(task.eval_problems),
               **dropped_prompts(task), "seed": cfg.seed, "parameters": n_params,
               "sft_seconds": round(sft_seconds, 1),
               "wall_seconds": round(time.perf_counter() - start, 1)}
    write_model_card(cfg, out, "demo", summary, task)
    write_json(out / "summary.json", summary)
    finish_run(out)  # after summary.json: a crash before this point resumes at the last step
    print(summarize_table(read_metrics(out / "metrics.jsonl")))
    print(f"held-out accuracy: SFT {sft_accuracy:.3f} -> GRPO {rl_accuracy:.3f} "
          f"({rl_accuracy - sft_accuracy:+.3f}) on {len(task.eval_problems)} problems, "
          f"{summary['wall_seconds']:.0f} s. Report: {Path(out) / 'report.png'}")
    return summary
