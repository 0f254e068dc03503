"""Best-of-n sampling at inference, and the estimators that report it.

    generate   n completions per prompt (temperature sampling, seeded)
    score      every completion with the scorer: the task's verifiable reward, or a reward model's
               normalised score; the task's reward is always kept as the gold
    select     for k = 1, 2, 4, ..., n: the expected gold and score of the best-of-k completion, and pass@k

No new samples are drawn for smaller k: both estimators average over all k-subsets of the n samples
(exactly, from ranks and counts, not by enumerating subsets), which is unbiased for drawing k fresh
samples and has lower variance than using the first k. With the 0/1 verifier as scorer, best-of-k
keeps a correct completion whenever one of the k is correct, so its accuracy equals pass@k.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from posttrain.models.adapters import refuse_peft as _no_peft
from posttrain.config import RunConfig
from posttrain.models.chat import decode_responses, encode_prompts, stop_token_ids
from posttrain.rollout import generate
from posttrain.train.control import metrics_logger
from posttrain.train.evaluate import evaluate_problems
from posttrain.train.optim import PhaseTimer
from posttrain.train.run import progress_bar, start_run, write_json
from posttrain.train.tracking import log_samples

Scorer = Callable[[list[str], list[str], list[bool], list], list[float]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1 and its numerically stable form):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    the probability that a uniformly random k-subset of the n samples contains a correct one. The
    product never forms the (huge) binomials. 1 when n - c < k (every k-subset holds a correct sample).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def best_of_k(scores: Sequence[float], values: Sequence[float], k: int) -> float:
    """Expected `values` of the best-scored sample of a uniformly random k-subset of the n samples.

    Order the samples by score, ties broken towards the earlier sample (argmax's choice). The sample in
    ascending position j (0-based) is the best of a k-subset exactly when the subset holds it and k - 1
    samples from the j below it, so

        E = sum_j values_(j) C(j, k - 1) / C(n, k)

    computed with exact integer binomials. k = 1 gives the mean of `values`; k = n the value of the best.
    """
    n = len(scores)
    if len(values) != n or not 1 <= k <= n:
        raise ValueError(f"need len(values) == len(scores) == n and 1 <= k <= n; got {len(scores)}, "
                         f"{len(values)}, k={k}")
    order = sorted(range(n), key=lambda i: (scores[i], -i))  # ascending; the last is the argmax
    total = math.comb(n, k)
    return sum(values[i] * (math.comb(j, k - 1) / total) for j, i in enumerate(order) if j >= k - 1)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def build_scorer(spec: str, task) -> Scorer:
    """'task': the task's verifiable reward; otherwise a reward-model directory (its normalised score)."""
    if spec == "task":
        return lambda prompts, completions, finished, problems: [float(r) for r in
                                                                 task.reward(prompts, completions, problems)]
    from posttrain.models.reward import RewardModel

    rm = RewardModel.load(spec)
    return lambda prompts, completions, finished, problems: rm.score(prompts, completions, finished).tolist()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], n: int, *, batch_size: int, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None,
                       progress=None) -> tuple[list[list[str]], list[list[bool]]]:
    """`n` sampled completions of each prompt, and whether each ended with EOS; [prompt][sample]."""
    was_training = model.training
    model.eval()
    completions, finished = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = encode_prompts(tokenizer, [p for p in chunk for _ in range(n)])
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=generator)
        texts = decode_responses(tokenizer, out.response_ids, out.response_mask)
        done = out.finished.tolist()
        completions += [texts[j * n:(j + 1) * n] for j in range(len(chunk))]
        finished += [done[j * n:(j + 1) * n] for j in range(len(chunk))]
        if progress is not None:
            progress.update(len(chunk))
    model.train(was_training)
    return completions, finished


def score_samples(scorer: Scorer, task, problems: list, completions: list[list[str]],
                  finished: list[list[bool]]) -> tuple[list[list[float]], list[list[float]]]:
    """(scores, gold), each [prompt][sample]: the scorer's and the task's reward of every completion."""
    n = len(completions[0]) if completions else 0
    flat_p = [p for p in problems for _ in range(n)]
    prompts = [p.prompt for p in flat_p]
    flat_c = [c for row in completions for c in row]
    flat_f = [f for row in finished for f in row]
    scores = scorer(prompts, flat_c, flat_f, flat_p)
    gold = [float(r) for r in task.reward(prompts, flat_c, flat_p)]
    return ([scores[i * n:(i + 1) * n] for i in range(len(problems))],
            [gold[i * n:(i + 1) * n] for i in range(len(problems))])


@dataclass
class BestOfNResult:
    completions: list[list[str]]  # [prompt][sample]
    scores: list[list[float]]  # the scorer's score of each sample
    gold: list[list[float]]  # the task's reward of each sample
    table: list[dict]  # one row per k: n, accuracy, score_mean, pass_at_k
    seconds: dict[str, float]  # time/generate, time/score, time/select


def best_of_n(cfg, model, tokenizer, task, problems: list, scorer: Scorer, progress=None) -> BestOfNResult:
    """Sample `cfg.bon.n` completions per problem, score them, and tabulate best-of-k for k = 1, 2, 4, ..., n."""
    c, timer = cfg.bon, PhaseTimer()
    with timer("generate"):
        completions, finished = sample_completions(
            model, tokenizer, [p.prompt for p in problems], c.n, batch_size=c.batch_size,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
            generator=torch.Generator().manual_seed(cfg.seed), progress=progress)
    with timer("score"):
        scores, gold = score_samples(scorer, task, problems, completions, finished)
    with timer("select"):
        table = []
        for k in k_values(c.n):
            table.append({
                "n": k,
                "accuracy": sum(best_of_k(s, g, k) for s, g in zip(scores, gold, strict=True)) / len(problems),
                "score_mean": sum(best_of_k(s, s, k) for s in scores) / len(problems),
                "pass_at_k": sum(pass_at_k(c.n, int(sum(g >= 1.0 for g in row)), k) for row in gold) / len(problems),
            })
    return BestOfNResult(completions, scores, gold, table, timer.pop())


def best_rows(problems: list, result: BestOfNResult) -> list[dict]:
    """Per problem: the best of all n completions (first argmax of the score), its score and gold, and how
    many of the n were correct."""
    rows = []
    for p, comps, s, g in zip(problems, result.completions, result.scores, result.gold, strict=True):
        i = max(range(len(s)), key=lambda j: (s[j], -j))
        rows.append({"prompt": p.prompt, "answer": getattr(p, "answer", None), "best": comps[i], "score": s[i],
                     "gold": g[i], "num_correct": int(sum(x >= 1.0 for x in g)), "n": len(s)})
    return rows


def format_table(table: list[dict]) -> str:
    """The best-of-k table as aligned text."""
    lines = [f"{'n':>4}  {'accuracy':>9}  {'score':>8}  {'pass@n':>7}"]
    lines += [f"{r['n']:>4}  {r['accuracy']:>9.4f}  {r['score_mean']:>8.4f}  {r['pass_at_k']:>7.4f}" for r in table]
    return "\n".join(lines)


def run_bon(cfg: RunConfig) -> dict:
    """Best-of-n on the task's held-out problems with `model.path` and `bon.scorer`: table, plot, best.jsonl."""
    _no_peft(cfg.model, "bon", "it trains nothing, so the adapter would be zero; point model.path at a run's "
             "merged final/")
    import json

    from posttrain.train.report_offline import plot_best_of_n

    from posttrain.errors import ConfigError

    if cfg.model.path is None:
        raise ConfigError("best-of-n needs a trained model: pass --model DIR (model.path)")
    start = time.perf_counter()
    out, task, model, tokenizer = start_run(cfg)
    c = cfg.bon
    scorer = build_scorer(c.scorer, task)
    problems = task.eval_problems[:c.num_prompts]
    greedy_eval = evaluate_problems(model, tokenizer, task, problems, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    greedy = greedy_eval.accuracy
    with progress_bar(len(problems), f"best-of-{c.n}", cfg.progress) as bar:
        result = best_of_n(cfg, model, tokenizer, task, problems, scorer, bar)
    with metrics_logger(out, None, cfg) as logger:
        for row in result.table:
            logger.log({"step": row["n"], "phase": "bon", **row})
        logger.log({"step": c.n, "phase": "bon", "greedy_accuracy": greedy, **result.seconds})
        log_samples(logger, "bon", c.n, greedy_eval.samples(cfg.logging.sample_generations))  # the greedy ones
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
