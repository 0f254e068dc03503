"""Online RL, one loop for every algorithm (GRPO and family, PPO-RLHF) and every backend.

Every algorithm is a composition of registered pieces named in the config (rl.advantage, rl.policy_loss,
rl.kl_estimator + rl.kl_placement, rl.loss_agg) plus DAPO's switches; presets (posttrain/presets.py) are just
settings. What they select is resolved once, in `RLRun.create` (the phases below) and in `ExperienceRecipe` /
`ActorLoss`; the loop never tests an algorithm's name or a config flag. The roles (posttrain/rl/roles.py) run in
this process (`backend: local`) or as Ray actors (`backend: ray`, posttrain/distributed); the loop is the same.

    for each step t:
      generate    G samples for each of N prompts, in shares, share s sampled with shard_seed(seed, t, round, s),
                  with per-token log-probs (pi_old); with dynamic sampling, more rounds until N groups have
                  unequal scores (DAPO)
      score       each share as it arrives: the task's reward or the reward model's normalised score, plus the
                  shaping (missing-EOS penalty, DAPO's overlong penalty); the task's reward is the gold
      baseline    the score of each prompt's greedy response (estimators that need baseline_rewards: ReMax)
      reference   log pi_ref and V_old on the learner ranks (when there is a reference or a critic)
      advantages  token rewards (score on the last token, - beta * KL_t per token with kl_placement "reward"),
                  the registered estimator, optional whitening, DAPO's truncation filter on the loss mask, the
                  invariants (rl/experience.py)
      update      ppo_epochs x mini_batches optimizer steps on the learner ranks (rl/learner.py)
      kl          the adaptive KL controller follows KL(pi_old || pi_ref)
      sync        the new weights to the rollout workers, checked by sha256 (nothing to send in one process)
      log/eval    the metrics line with every phase's time; held-out greedy accuracy every eval_every steps (a
                  table of samples to the trackers); the non-finite guard and the checkpoint

Off-policy (`ray.max_staleness` = k > 0, backend ray; rl/ahead.py): the update is submitted to the learner ranks,
and while they train the driver samples (generate, score, baseline) the batches of the next k steps that are not
sampled yet; the rollout workers still hold the weights of before this step's update (the sync comes after), so
a batch is trained by a policy up to k updates newer than the one that made it. Every sample records its policy
version and the step checks 0 <= lag <= k (`policy_lag`, logged). log pi_old is then recomputed by the learner
on the current weights (the reference phase, as for an external engine), the engine's log pi_rollout of the older
policy is kept, and rl.rollout_correction weighs pi_old / pi_rollout. The ratio invariant still holds: the first
minibatch's ratio pi / pi_old is 1, against the recomputed pi_old. A checkpoint holds the batches sampled ahead.

A "step" is one rollout batch of prompts_per_step * group_size sequences and the optimizer steps taken on it;
learning-rate schedules count steps. Departures from the papers, all configurable: log pi_old is the one
generation returns (equal to a fresh forward pass to ~1e-6, checked every step by the ratio invariant; in bf16
and for an external engine recomputed by the trainer, the engine's kept as rollout_logprobs: the mismatch is
logged every step and rl.rollout_correction weighs it), which saves a forward pass; the critic has its own
optimizer rather than a shared trunk with a value-loss coefficient (as OpenRLHF and verl).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.algos import ADVANTAGES, AdaptiveKLController, FixedKLController
from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.data.sampling import as_random_state
from posttrain.errors import ConfigError, InvariantError
from posttrain.rl.ahead import Rollouts, policy_lag, rollouts_from_state, rollouts_state
from posttrain.rl.experience import (ExperienceRecipe, ScoredRollouts, build_experience, experience_metrics,
                                     informative_rounds, policy_kl)
from posttrain.rl.learner import LearnerState
from posttrain.rl.roles import InlineRoles, Roles
from posttrain.rollout.engines import shard_seed
from posttrain.tasks.registry import Task
from posttrain.train.control import NoControl, RunControl
from posttrain.train.optim import PhaseTimer
from posttrain.train.rollout_log import rollout_log_hook
from posttrain.train.tracking import held_out


@dataclass
class StepRecord:
    """What the loop needs from a step's experience besides its metrics."""

    kl: float | None  # KL(pi_old || pi_ref), what the adaptive controller follows; None without a reference
    num_tokens: int  # tokens under the loss mask
    num_seqs: int  # sequences in the experience


@dataclass
class RLRun:
    """What the loop keeps between steps, and the phases cfg.rl selects, resolved once."""

    cfg: RunConfig
    roles: Roles
    task: Task
    recipe: ExperienceRecipe
    rng: random.Random  # prompt order
    kl_ctl: FixedKLController | AdaptiveKLController
    sample: Callable[[int, PhaseTimer], tuple[ScoredRollouts, ScoredRollouts, dict]]  # (step) -> (train, all, m)
    baseline: Callable[[ScoredRollouts, PhaseTimer], torch.Tensor | None]
    reference: Callable[[RolloutBatch, PhaseTimer], tuple[RolloutBatch, torch.Tensor | None, torch.Tensor | None]]
    log_rollouts: Callable = lambda step, batch, scores, gold: None  # rl.log_rollouts_every (train/rollout_log.py)
    max_staleness: int = 0  # ray.max_staleness: batches sampled ahead of their step (0: on-policy)
    ahead: deque[Rollouts] = field(default_factory=deque)  # the batches of the next steps, sampled ahead, in order
    steps_done: int = 0  # `step()` only; train_rl passes the step number
    last: StepRecord | None = None

    @classmethod
    def create(cls, cfg: RunConfig, roles: Roles, task) -> "RLRun":
        c = cfg.rl
        G, pad = c.group_size, roles.tokenizer.pad_token_id
        rng = random.Random(f"rl-{cfg.seed}")
        kl_ctl = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.kl_target is not None
                  else FixedKLController(c.kl_coef))

        def sample_round(step: int, round_: int, timer: PhaseTimer) -> ScoredRollouts:
            with timer("generate"):
                problems = task.sample_prompts(rng, c.prompts_per_step)
            seeds = [shard_seed(cfg.seed, step, round_, s) for s in range(len(roles.rollout_workers))]
            return roles.rollout([p for p in problems for _ in range(G)], seeds, timer)

        def one_round(step, timer):
            data = sample_round(step, 0, timer)
            return data, data, {}

        def dynamic_sampling(step, timer):
            return informative_rounds(c, lambda round_: sample_round(step, round_, timer), pad)

        def greedy_baseline(data: ScoredRollouts, timer: PhaseTimer) -> torch.Tensor:
            with timer("baseline"):
                return roles.rollout(data.problems[::G], None, PhaseTimer()).scores.repeat_interleave(G)

        def learner_forward(batch: RolloutBatch, timer: PhaseTimer):
            with timer("reference"):
                fwd = roles.forward(batch)
            if fwd["logprobs"] is not None:  # an external engine: pi_old from the training forward pass
                batch = dataclasses.replace(batch, old_logprobs=fwd["logprobs"])
            return batch, fwd["ref_logprobs"], fwd["values"]

        needs = ADVANTAGES.requires(c.advantage)
        forward = c.kl_coef > 0 or "values" in needs or roles.recompute_in_forward
        if cfg.ray.max_staleness > 0 and roles.shared:
            raise ConfigError(f"ray.max_staleness={cfg.ray.max_staleness} needs rollout workers with their own "
                              "weights (backend ray, or InlineRoles.like_ray); these generate with the learner's")
        return cls(cfg, roles, task, ExperienceRecipe.from_config(c), rng, kl_ctl,
                   dynamic_sampling if c.dynamic_sampling else one_round,
                   greedy_baseline if "baseline_rewards" in needs else (lambda data, timer: None),
                   learner_forward if forward else (lambda batch, timer: (batch, None, None)),
                   rollout_log_hook(cfg, roles.tokenizer), cfg.ray.max_staleness)

    @classmethod
    def local(cls, cfg: RunConfig, policy, tokenizer, task) -> "RLRun":
        """A run with its roles in this process (`InlineRoles.local`), `policy` trained in place; with `step()`,
        the loop one step at a time (the Python API, tests, benchmarks)."""
        return cls.create(cfg, InlineRoles.local(cfg, policy, tokenizer, task), task)

    @property
    def learner(self) -> LearnerState:
        """The learner's state (policy, reference, critic, optimizers) of roles in this process."""
        return self.roles.learners.workers[0].state

    def step(self, timer: PhaseTimer | None = None) -> dict:
        """The next rollout step (`rl_step`); its metrics. `self.last` holds its StepRecord."""
        self.steps_done += 1
        metrics, self.last = rl_step(self, self.steps_done, timer or PhaseTimer())
        return metrics

    def snapshot(self, accuracy: float) -> tuple[dict, dict]:
        """Everything a resumed run needs to continue exactly: ({model: weights}, state)."""
        weights, snap = self.roles.snapshot()
        return weights, {**snap, "rng": self.rng.getstate(), "kl_ctl": self.kl_ctl.state_dict(), "accuracy": accuracy,
                         "ahead": rollouts_state(self.ahead, self.task)}

    def restore(self, weights: dict, snap: dict) -> float:
        """Load a `snapshot` into this freshly set-up run; returns the accuracy it recorded."""
        self.roles.restore(weights, snap)
        self.rng.setstate(as_random_state(snap["rng"]))
        self.kl_ctl.load_state_dict(snap["kl_ctl"])
        self.ahead = deque(rollouts_from_state(snap.get("ahead", []), self.task))
        return snap["accuracy"]


def collect(run: RLRun, step: int, timer: PhaseTimer) -> Rollouts:
    """Generate and score step `step`'s batch (and ReMax's baseline) with the rollout workers' current weights,
    recording their policy version on every row."""
    version = run.roles.version
    data, allgen, metrics = run.sample(step, timer)
    run.log_rollouts(step, allgen.batch, allgen.scores, allgen.gold)
    baseline = run.baseline(data, timer)
    return Rollouts(step, data, allgen, metrics, baseline, torch.full((len(data.batch),), version, dtype=torch.long))


def sample_ahead(run: RLRun, step: int, timer: PhaseTimer) -> None:
    """During step `step`'s update: sample the batches of steps step+1 .. step+max_staleness (at most
    rl.steps) not sampled yet (none on-policy). rl/ahead.py: why the lag stays <= max_staleness."""
    first = run.ahead[-1].step + 1 if run.ahead else step + 1
    for ahead_step in range(first, min(step + run.max_staleness, run.cfg.rl.steps) + 1):
        run.ahead.append(collect(run, ahead_step, timer))


def make_experience(run: RLRun, step: int, timer: PhaseTimer):
    """The step's rollout batch (sampled ahead, or generated and scored now), then reference and advantages:
    computed once. -> (Experience, StepRecord, metrics)"""
    rollouts = run.ahead.popleft() if run.ahead else collect(run, step, timer)
    if rollouts.step != step:
        raise InvariantError(f"the batch sampled ahead for step {rollouts.step} came up in step {step}")
    lag = policy_lag(run.roles.updates, rollouts, run.max_staleness)
    data, allgen, metrics, baseline = rollouts.data, rollouts.allgen, dict(rollouts.metrics), rollouts.baseline
    batch, ref_logprobs, values = run.reference(data.batch, timer)
    with timer("advantages"):
        exp, returns = build_experience(run.recipe, data, batch, baseline=baseline, ref_logprobs=ref_logprobs,
                                        values=values, kl_coef=run.kl_ctl.value)
    metrics.update(experience_metrics(data, allgen, batch, group_size=run.cfg.rl.group_size, baseline=baseline,
                                      ref_logprobs=ref_logprobs, values=values, returns=returns),
                   policy_lag=int(lag.max()))
    kl = policy_kl(batch, ref_logprobs) if ref_logprobs is not None else None
    return exp, StepRecord(kl, int(exp.num_tokens), len(exp)), metrics


def rl_step(run: RLRun, step: int, timer: PhaseTimer) -> tuple[dict, StepRecord]:
    """One rollout step: experience, update (and, off-policy, sampling ahead while the learner trains), KL
    controller, weight sync. -> (metrics, the step's record)"""
    try:
        exp, info, metrics = make_experience(run, step, timer)
        kl_coef = run.kl_ctl.value
        with timer("update"):
            pending = run.roles.submit_update(exp, kl_coef)
        sample_ahead(run, step, timer)  # before the sync: with the weights of before this update
        with timer("update"):
            stats, lr = run.roles.finish_update(pending)
    except InvariantError as err:
        raise InvariantError(f"RL step {step}: {err}") from None
    if info.kl is not None:
        run.kl_ctl.update(info.kl, n_steps=info.num_seqs)
    with timer("sync"):
        run.roles.sync()
    return {**metrics, **stats, "kl_coef": kl_coef, "lr": lr}, info


def train_rl(cfg: RunConfig, roles: Roles, task, logger, progress=None, ctl: RunControl | None = None,
             evaluator: Callable[[], float] | None = None) -> float:
    """Run `cfg.rl.steps` rollout steps (from a checkpoint's step when `ctl` resumes) and return the final
    held-out accuracy; the policy the roles were built with then holds the final weights. `ctl` saves
    checkpoints and handles signals and non-finite steps. `evaluator`: the held-out evaluation (default: greedy
    accuracy on the task's eval problems, its first samples logged as a table: train/tracking.py `held_out`),
    e.g. one that keeps per-prompt scores."""
    ctl = ctl or NoControl()
    run = RLRun.create(cfg, roles, task)

    def evaluate_now(step: int) -> float:
        if evaluator is not None:
            return evaluator()
        return held_out(cfg, roles.policy(), roles.tokenizer, task, logger, "rl", step).accuracy

    timer = PhaseTimer()
    accuracy, first = ctl.restore_phase("rl", run.restore, float("nan"), progress)
    for step in range(first, cfg.rl.steps + 1):
        start = time.perf_counter()
        metrics, info = rl_step(run, step, timer)
        record = {"step": step, "phase": "rl", **metrics, "tokens_per_s": info.num_tokens / (time.perf_counter() - start),
                  **roles.metrics()}
        if (cfg.rl.eval_every and step % cfg.rl.eval_every == 0) or step == cfg.rl.steps:
            with timer("eval"):
                accuracy = evaluate_now(step)
            record["accuracy"] = accuracy
        logger.log({**record, **timer.pop()})
        ctl.end_step("rl", step, record["skipped_steps"] == 0, lambda: run.snapshot(accuracy), progress,
                     reward=f"{record['reward_mean']:.3f}", acc=f"{accuracy:.3f}", kl=f"{record.get('kl', 0.0):.3f}")
    if cfg.rl.steps == 0:
        accuracy = evaluate_now(0)
        logger.log({"step": 0, "phase": "rl", "accuracy": accuracy})
    roles.policy()  # the caller's model: the final weights
    return accuracy
