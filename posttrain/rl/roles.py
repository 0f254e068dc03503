"""The roles the RL loop calls, and how their workers are reached: in this process (`InlineRole`) or as Ray
actors (posttrain/distributed/pool.py `RayRole`, the same interface).

    roles.rollout(problems, seeds, timer)   generate `problems` in shares (share s sampled with seeds[s]; None:
                                            greedy), score each share as soon as it arrives   -> ScoredRollouts
    roles.forward(batch)                    log pi_ref, V_old (and log pi_old for an external engine), share r
                                            on learner rank r                                 -> dict of (B, T)
    roles.update(experience, kl_coef)       every learner rank: the actor/critic update, gradients reduced over
                                            the ranks                                          -> metrics, lr
                                            (= finish_update(submit_update(...)): Ray ranks run it while the
                                            driver samples ahead, ray.max_staleness > 0)
    roles.sync()                            rank 0's weights to every rollout worker (with model.peft the
                                            adapter alone), checked by sha256; roles.version: the updates behind
                                            the weights they now generate with; roles.sync_bytes: their size
    roles.policy()                          this process's policy with the current weights (evaluation)
    roles.snapshot() / roles.restore(...)   rank 0's state for a checkpoint

`InlineRoles.local` is `backend: local`: one rollout worker, one reward worker and one learner in this process,
the rollout worker generating with the learner's own policy (nothing to sync). `InlineRoles.like_ray` is the
Ray layout in one process (a policy copy per worker, ray.num_learners shares): what the Ray run is compared with.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.errors import WorkerError
from posttrain.models.adapters import load_trainable_state_dict
from posttrain.rl.experience import ScoredRollouts
from posttrain.rl.learner import Learner, combine_update
from posttrain.rl.workers import RewardWorker, RolloutWorker, merge_breakdowns
from posttrain.train.optim import PhaseTimer


@dataclass
class Call:
    worker: int  # index of the worker in its role
    method: str
    args: tuple
    ref: Any = None  # Ray ObjectRef of the result (RayRole), or the result itself (InlineRole)
    started: float = 0.0  # time.monotonic() when (re-)issued
    incarnation: int = 0  # RayRole: which actor of this worker slot it was issued to (restarts count up)


@dataclass
class RestartBudget:
    """ray.max_restarts, shared by every role of a run; `log` holds each restart: role, worker, the call that
    found it dead, and the seconds from that moment until a fresh actor was up to date (a learner rank's entry
    has `resumed` instead: every role was restarted and the run resumed from its newest checkpoint)."""

    left: int
    log: list[dict] = field(default_factory=list)


class InlineRole:
    """A role's workers as plain objects in this process: calls run when submitted."""

    def __init__(self, name: str, cls, n: int, args: tuple | Callable[[int], tuple]):
        self.name = name
        self.workers = [cls(*(args(i) if callable(args) else args)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.workers)

    def put(self, obj):
        return obj

    def submit(self, worker: int, method: str, *args) -> Call:
        return Call(worker, method, args, getattr(self.workers[worker], method)(*args), time.monotonic())

    def as_completed(self, calls: list[Call]) -> Iterator[tuple[int, Any]]:
        for k, call in enumerate(calls):
            yield k, call.ref

    def gather(self, calls: list[Call]) -> list:
        return [call.ref for call in calls]

    def shutdown(self) -> None:
        self.workers = []


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """The bytes of a state dict's tensors (numel x element size, summed): what one copy of it sends."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def split_even(items: list, n: int) -> list[list]:
    """`items` in `n` contiguous parts, as equal as possible (the first ones one longer)."""
    q, r = divmod(len(items), n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + q + (i < r))
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


class Roles:
    """The rollout workers, reward workers and learner ranks of a run, each an InlineRole or a RayRole.

    learner_shares[i]: the minibatch shares learner i computes ([[0], [1], ...] for Ray ranks; [[0, ..., M-1]]
    for one learner in this process). `policy`: this process's model, which holds the final weights when the
    loop returns; `shared`: the rollout worker generates with the learner's own policy (`InlineRoles.local`)."""

    def __init__(self, cfg: RunConfig, tokenizer, policy, rollout, reward, learners, learner_shares: list[list[int]],
                 budget: RestartBudget | None = None, shared: bool = False, report_ray: bool = True):
        self.cfg, self.tokenizer, self._policy = cfg, tokenizer, policy
        self.rollout_workers, self.reward_workers, self.learners = rollout, reward, learners
        self.learner_shares, self.shared = learner_shares, shared
        self.budget = budget or RestartBudget(0)
        self.weights = None  # the current policy weights as the rollout workers receive them (a Ray ref or a dict)
        self.latest: dict | None = None  # the same weights in this process
        self.sha256: str | None = None
        self.sync_bytes = 0  # the size of the last sync's weights (one copy; every rollout worker loads it)
        # log pi_old from the trainer's forward pass: an external engine, or samples of an older policy (off-policy)
        self.recompute_in_forward = cfg.ray.engine != "torch" or cfg.ray.max_staleness > 0
        self.updates = 0  # updates the learner has taken (a resumed run: counted from the start)
        self.version = 0  # the policy version of the rollout workers' weights: `updates` at the last sync
        self.report_ray = report_ray  # the Ray layout logs ray/restarts and ray/sync_bytes
        self.from_reward_model = cfg.rl.reward == "reward_model"  # the raw scores are a reward model's

    # the loop's calls ----------------------------------------------------------------------------------------
    def rollout(self, problems: list, seeds: list[int] | None, timer: PhaseTimer) -> ScoredRollouts:
        """Generate `problems` in len(self.rollout_workers) contiguous shares, score each share on a reward worker as soon
        as it arrives, and join them in order."""
        parts = [p for p in split_even(problems, len(self.rollout_workers)) if p]
        batches: list[RolloutBatch | None] = [None] * len(parts)
        score_calls = [None] * len(parts)
        with timer("generate"):
            gen_calls = [self.rollout_workers.submit(s, "generate", part, None if seeds is None
                                             else seeds[s]) for s, part in enumerate(parts)]
            for s, batch in self.rollout_workers.as_completed(gen_calls):
                batches[s] = batch
                score_calls[s] = self.reward_workers.submit(s % len(self.reward_workers), "score", parts[s], batch)
        with timer("score"):
            scored = self.reward_workers.gather(score_calls)
        parts_scored = [ScoredRollouts(b, part, x.gold, x.raw, x.penalty, x.overlong,
                                       from_reward_model=self.from_reward_model)
                        for b, part, x in zip(batches, parts, scored, strict=True)]
        return ScoredRollouts.cat(parts_scored, self.tokenizer.pad_token_id,
                                  merge_breakdowns([x.breakdown for x in scored]))

    def forward(self, batch: RolloutBatch) -> dict:
        """log pi_ref, V_old (and for an external engine log pi_old) of `batch`: share r on learner rank r."""
        M = self.cfg.ray.num_learners if not self.shared else 1
        shares = [batch.select(slice(r * len(batch) // M, (r + 1) * len(batch) // M)) for r in range(M)]
        calls = [self.learners.submit(i, "forward", [shares[r] for r in owned], self.recompute_in_forward)
                 for i, owned in enumerate(self.learner_shares)]
        parts = [part for result in self.learners.gather(calls) for part in result]
        return {key: None if parts[0][key] is None else torch.cat([p[key].cpu() for p in parts]) for key in parts[0]}

    def update(self, experience, kl_coef: float) -> tuple[dict, float]:
        """The update on every learner rank; its metrics (combined over the shares) and the new learning rate."""
        return self.finish_update(self.submit_update(experience, kl_coef))

    def submit_update(self, experience, kl_coef: float) -> list[Call]:
        """Start the update on every learner rank (Ray: the call returns at once and the ranks train while the
        driver goes on; in this process it runs here)."""
        put = self.learners.put(experience)
        return [self.learners.submit(i, "update", put, kl_coef) for i in range(len(self.learners))]

    def finish_update(self, calls: list[Call]) -> tuple[dict, float]:
        """Wait for `submit_update`'s calls; the update's metrics and the new learning rate."""
        results = self.learners.gather(calls)
        self.updates += 1
        return combine_update(results), results[0]["lr"]

    def sync(self) -> None:
        """Send the learner's weights (with model.peft the adapter alone: `Learner.weights`) to every rollout
        worker and check the checksums: every rank must hold the same weights, and every rollout worker must
        report the sha256 of what rank 0 sent. Nothing to send when the rollout worker generates with the
        learner's policy. The rollout workers then hold policy version `self.version` (= `self.updates`)."""
        if self.shared:
            self.version = self.updates
            return
        calls = [self.learners.submit(0, "weights")]
        calls += [self.learners.submit(i, "checksum") for i in range(1, len(self.learners))]
        results = self.learners.gather(calls)
        weights, sha = results[0]
        for rank, other in enumerate(results[1:], start=1):
            if other != sha:
                raise WorkerError(f"learner ranks hold different weights after the update (sha256 {sha[:12]} on "
                                  f"rank 0, {other[:12]} on rank {rank})")
        self.latest, self.sha256, self.sync_bytes = weights, sha, state_dict_bytes(weights)
        self.weights = self.rollout_workers.put(weights)
        got = self.rollout_workers.gather([self.rollout_workers.submit(i, "load_weights", self.weights)
                                   for i in range(len(self.rollout_workers))])
        for i, worker_sha in enumerate(got):
            self.verify(i, worker_sha)
        self.version = self.updates

    def verify(self, i: int, worker_sha: str) -> None:
        if worker_sha != self.sha256:
            raise WorkerError(f"rollout worker {i} holds weights with sha256 {worker_sha[:12]} after the sync; the "
                              f"learner sent {self.sha256[:12]}")

    def policy(self) -> torch.nn.Module:
        """This process's policy, holding the weights of the last sync."""
        if not self.shared and self.latest is not None:
            load_trainable_state_dict(self._policy, self.latest)
        return self._policy

    def snapshot(self) -> tuple[dict, dict]:
        weights, snap = self.learners.gather([self.learners.submit(0, "snapshot")])[0]
        return weights, {**snap, "policy_version": self.version}

    def restore(self, weights: dict, snap: dict) -> None:
        self.learners_call("restore", weights, snap)
        self.updates = snap.get("policy_version", 0)  # a checkpoint from before the key: versions from 0
        self.sync()

    def metrics(self) -> dict[str, float]:
        """The roles' own metrics for the step's line (Ray layout): the worker restarts so far, and the bytes of
        the last weight sync (one copy of what each rollout worker loads)."""
        return {"ray/restarts": len(self.budget.log), "ray/sync_bytes": self.sync_bytes} if self.report_ray else {}

    def learners_call(self, method: str, *args) -> list:
        """The same call on every learner (rank order); their results."""
        return self.learners.gather([self.learners.submit(i, method, *args) for i in range(len(self.learners))])

    def shutdown(self) -> None:
        for role in (self.rollout_workers, self.reward_workers, self.learners):
            role.shutdown()


class InlineRoles:
    """Roles whose workers are plain objects in this process."""

    @staticmethod
    def local(cfg: RunConfig, policy, tokenizer, task) -> Roles:
        """`backend: local`: one learner training `policy` in place, one rollout worker generating with it, one
        reward worker; torch's thread count is left as the run set it."""
        learners = InlineRole("learner", Learner, 1, (cfg, policy, tokenizer, task, [0], 1, None, _device(cfg)))
        rollout = InlineRole("rollout worker", RolloutWorker, 1, (cfg, policy, tokenizer, None, True, task))
        reward = InlineRole("reward worker", RewardWorker, 1, (cfg, tokenizer, task))
        return Roles(cfg, tokenizer, policy, rollout, reward, learners, [[0]], shared=True, report_ray=False)

    @staticmethod
    def like_ray(cfg: RunConfig, policy, tokenizer, task) -> Roles:
        """The Ray layout in this process, with the same shares, seeds and thread count (ray.threads_per_worker):
        the single-process run a Ray run is compared with. One learner computes all ray.num_learners shares in
        turn; each role holds its own copy of `policy`, which is left as it is until `policy()` loads the weights."""
        r = cfg.ray
        threads = r.threads_per_worker
        learners = InlineRole("learner", Learner, 1, lambda i: (cfg, copy.deepcopy(policy), tokenizer, task,
                                                                list(range(r.num_learners)), r.num_learners, threads))
        rollout = InlineRole("rollout worker", RolloutWorker, r.num_rollout_workers,
                             lambda i: (cfg, copy.deepcopy(policy), tokenizer, threads, False, task))
        reward = InlineRole("reward worker", RewardWorker, max(1, r.num_reward_workers), (cfg, tokenizer, task, threads))
        roles = Roles(cfg, tokenizer, policy, rollout, reward, learners, [list(range(r.num_learners))])
        roles.sync()
        return roles


def _device(cfg: RunConfig) -> str:
    from posttrain.models.loading import resolve_device  # noqa: PLC0415

    return str(resolve_device(cfg.model))
