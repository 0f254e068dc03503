"""One rollout batch from the workers: posttrain.recipes.experience.make_experience with its generate, score,
reference and values phases sharded.

    generate    the driver draws the prompts (its own `rng`, as the local loop); rollout worker s samples share s
                with the seed shard_seed(seed, step, round, s)
    score       each share goes to a reward worker as soon as it is generated (experience.score there)
    baseline    ReMax: the greedy responses, shared among the rollout workers, scored by the reward workers
    reference   learner rank r: log pi_ref and V_old of share r of the batch
    advantages  here, on the whole batch, exactly as the local loop (groups may straddle shares)

Everything after the shares are joined is the local loop's code (`finish_experience`, `informative_rounds`);
tests/distributed check that with one share generated from the same generator this gives the local loop's
Experience and metrics exactly.
"""

from __future__ import annotations

import torch

from posttrain.algos import ADVANTAGES
from posttrain.batch import RolloutBatch, cat_rollouts
from posttrain.buffer import Experience
from posttrain.config import RunConfig
from posttrain.distributed.engines import shard_seed
from posttrain.distributed.workers import merge_task_scores
from posttrain.recipes.common import PhaseTimer
from posttrain.recipes.experience import Scored, finish_experience, informative_rounds


def _split(items: list, n: int) -> list[list]:
    """`items` in `n` contiguous parts, as equal as possible (the first ones one longer)."""
    q, r = divmod(len(items), n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + q + (i < r))
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


def rollout_and_score(cluster, problems: list, seeds: list[int] | None, timer: PhaseTimer) -> Scored:
    """Generate `problems` in len(cluster.rollout) contiguous shares (share s sampled with seeds[s]; None: greedy),
    score each share on a reward worker as soon as it arrives, and join them in order."""
    parts = [p for p in _split(problems, len(cluster.rollout)) if p]
    pad = cluster.tokenizer.pad_token_id
    batches: list[RolloutBatch | None] = [None] * len(parts)
    with timer("generate"):
        gen_calls = [cluster.rollout.submit(s, "generate", [p.prompt for p in part],
                                            None if seeds is None else seeds[s]) for s, part in enumerate(parts)]
        cluster.event("generate_submitted")
        score_calls = [None] * len(parts)
        for s, batch in cluster.rollout.as_completed(gen_calls):
            batches[s] = batch
            score_calls[s] = cluster.reward.submit(s % len(cluster.reward), "score", parts[s], batch)
    with timer("score"):
        scored = cluster.reward.gather(score_calls)
    batch = cat_rollouts(batches, pad)
    return Scored(batch, problems, *(torch.cat([getattr(x, f) for x in scored]) for f in ("gold", "raw", "scores")),
                  merge_task_scores([x.task_scores for x in scored]))


def sample_groups(cfg: RunConfig, cluster, driver, timer: PhaseTimer, step: int, round_: int = 0) -> Scored:
    """G samples for each of prompts_per_step new problems, grouped contiguously, scored (sharded)."""
    with timer("generate"):
        problems = driver.task.sample_prompts(driver.rng, cfg.rl.prompts_per_step)
        expanded = [p for p in problems for _ in range(cfg.rl.group_size)]
    seeds = [shard_seed(cfg.seed, step, round_, s) for s in range(len(cluster.rollout))]
    return rollout_and_score(cluster, expanded, seeds, timer)


def dynamic_sampling(cfg: RunConfig, cluster, driver, timer: PhaseTimer, step: int) -> tuple[Scored, Scored, dict]:
    """DAPO's dynamic sampling (posttrain.recipes.experience.dynamic_sampling), each round sharded."""
    return informative_rounds(cfg, lambda round_: sample_groups(cfg, cluster, driver, timer, step, round_),
                              cluster.tokenizer.pad_token_id)


def learner_forward(cfg: RunConfig, cluster, batch: RolloutBatch) -> dict:
    """log pi_ref, V_old (and for an external engine log pi_old) of `batch`, share r computed by learner rank r."""
    M = cfg.ray.num_learners
    shares = [batch.select(slice(r * len(batch) // M, (r + 1) * len(batch) // M)) for r in range(M)]
    recompute = cfg.ray.engine != "torch"
    calls = [cluster.learners.submit(i, "forward", [shares[r] for r in owned], recompute)
             for i, owned in enumerate(cluster.learner_shares)]
    parts = [part for result in cluster.learners.gather(calls) for part in result]
    return {key: None if parts[0][key] is None else torch.cat([p[key] for p in parts]) for key in parts[0]}


def make_experience(cfg: RunConfig, cluster, driver, timer: PhaseTimer, step: int) -> tuple[Experience, dict]:
    """Generate, score, reference, values, advantages: one rollout batch, computed once (sharded)."""
    c = cfg.rl
    needs = ADVANTAGES.requires(c.advantage)
    if c.dynamic_sampling:
        data, allgen, metrics = dynamic_sampling(cfg, cluster, driver, timer, step)
    else:
        data = allgen = sample_groups(cfg, cluster, driver, timer, step)
        metrics = {}
    batch = data.batch
    baseline = None
    if "baseline_rewards" in needs:
        with timer("baseline"):
            greedy = rollout_and_score(cluster, data.problems[::c.group_size], None, PhaseTimer())
            baseline = greedy.scores.repeat_interleave(c.group_size)
    ref_logprobs = values = None
    if cluster.needs_learner_forward:
        with timer("reference"):
            fwd = learner_forward(cfg, cluster, batch)
        ref_logprobs, values = fwd["ref_logprobs"], fwd["values"]
        if fwd["logprobs"] is not None:  # an external engine: pi_old from the training forward pass
            batch = RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                                 fwd["logprobs"], batch.finished)
    return finish_experience(cfg, data, allgen, batch, metrics, timer, baseline=baseline, ref_logprobs=ref_logprobs,
                             values=values, kl_coef=driver.kl_ctl.value)
