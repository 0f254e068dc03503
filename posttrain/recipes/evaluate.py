"""`posttrain eval MODEL_DIR`: held-out accuracy of a model on a task, the evaluation the recipes run.

    greedy        the task's reward of each problem's greedy completion, averaged (what summary.json reports
                  as `rl_accuracy` / `sft_accuracy`: the same function, posttrain.train.evaluate)
    --samples N   N sampled completions per problem (bon.temperature / top_p / top_k, seeded): pass@k for
                  k = 1, 2, 4, ..., N (the unbiased estimator of recipes/best_of_n.py, a sample counting as
                  correct at reward >= 1) and majority-vote accuracy (the reward of the most frequent answer;
                  ties go to the answer seen first), where a completion's answer is the task's `answer_key`
                  (math tasks: the extracted final answer) or its stripped text

Given a run's `final/` directory, the run's own config.yaml is the default config, so the held-out split, the
chat template and the evaluation settings are the run's.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.models.loading import load_policy
from posttrain.recipes.best_of_n import k_values, pass_at_k, sample_completions
from posttrain.tasks import build_task, fit_task
from posttrain.train.evaluate import evaluate_problems
from posttrain.train.run import seed_everything, write_json


def majority_vote(keys: list[str], rewards: list[float]) -> float:
    """The reward of the most frequent answer key among one problem's samples (first seen wins a tie)."""
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)
    return rewards[keys.index(winner)]


def run_eval(cfg: RunConfig, samples: int = 0, output: str | Path | None = None) -> dict:
    """Greedy accuracy (and with `samples` > 0 pass@k and majority vote) of cfg.model.path on cfg.task's
    held-out problems; the results, also written as JSON to `output`."""
    start = time.perf_counter()
    task = build_task(cfg.task, cfg.seed, cfg.rl.reward_funcs, cfg.rl.reward_weights)
    seed_everything(cfg.seed, cfg.threads)
    # a run's config.yaml may name model.peft: its final/ is already merged, so no adapter is put on it
    model, tokenizer = load_policy(cfg.model.model_copy(update={"peft": None}), seed=cfg.seed)
    fit_task(task, cfg, model, tokenizer)
    problems = list(task.eval_problems)
    greedy = evaluate_problems(model, tokenizer, task, problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    result = {"model": cfg.model.path, "task": task.name, "eval_problems": len(problems),
              "greedy_accuracy": greedy.accuracy, "seed": cfg.seed}
    if samples > 0:
        b = cfg.bon
        texts, _ = sample_completions(model, tokenizer, [p.prompt for p in problems], samples,
                                      batch_size=b.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                      temperature=b.temperature, top_k=b.top_k, top_p=b.top_p,
                                      generator=torch.Generator().manual_seed(cfg.seed))
        flat_p = [p for p in problems for _ in range(samples)]
        flat_c = [c for row in texts for c in row]
        rewards = [float(r) for r in task.reward([p.prompt for p in flat_p], flat_c, flat_p)]
        per = [rewards[i * samples:(i + 1) * samples] for i in range(len(problems))]
        key = getattr(task, "answer_key", None) or (lambda text: text.strip())
        result["samples"] = samples
        result["sample_accuracy"] = sum(rewards) / len(rewards)
        result["pass_at_k"] = {str(k): sum(pass_at_k(samples, sum(r >= 1.0 for r in row), k) for row in per)
                               / len(problems) for k in k_values(samples)}
        result["majority_vote_accuracy"] = sum(
            majority_vote([key(c) for c in row_c], row_r) for row_c, row_r in zip(texts, per, strict=True)
        ) / len(problems)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(output), result)
    return result


def format_result(result: dict) -> str:
    """The results as an aligned table for the terminal."""
    rows = [("model", str(result["model"])), ("task", f"{result['task']} ({result['eval_problems']} held-out "
                                                      "problems)"),
            ("greedy accuracy", f"{result['greedy_accuracy']:.4f}")]
    if "samples" in result:
        rows.append((f"mean reward of {result['samples']} samples", f"{result['sample_accuracy']:.4f}"))
        rows += [(f"pass@{k}", f"{v:.4f}") for k, v in result["pass_at_k"].items()]
        rows.append(("majority vote", f"{result['majority_vote_accuracy']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
