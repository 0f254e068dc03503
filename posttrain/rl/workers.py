"""The rollout and reward roles of the RL loop: plain classes, run in this process (roles.InlineRoles) or as
Ray actors (posttrain/distributed), with the same code either way.

    RolloutWorker.generate(problems, seed)     -> RolloutBatch     (a policy behind a rollout engine, running the
                                                                    environment of every trajectory: env.name)
    RewardWorker.score(problems, batch)        -> RolloutScores    (the environment's reward or the task's on the
                                                                    final answer, a reward model, shaping)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos.shaping import overlong_penalty
from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.errors import WorkerError
from posttrain.models.adapters import synced_state_dict
from posttrain.models.chat import decode_responses, stop_token_ids
from posttrain.rewards.base import RewardBreakdown, reward_metrics
from posttrain.rollout.engines import RolloutEngine, TorchEngine
from posttrain.rollout.multiturn import EpisodeDriver
from posttrain.tasks import build_task
from posttrain.tasks.registry import breakdown


def make_engine(cfg: RunConfig, model, tokenizer, shared: bool = False) -> RolloutEngine:
    """The rollout engine `ray.engine` names, holding `model` (`shared`: see TorchEngine)."""
    if cfg.ray.engine == "vllm":
        from posttrain.rollout.vllm_engine import VLLMEngine  # noqa: PLC0415 (optional extra)

        return VLLMEngine(model, tokenizer, seed=cfg.seed, gpu_memory_utilization=cfg.ray.vllm_gpu_memory_utilization,
                          dtype=cfg.ray.vllm_dtype)
    c = cfg.rl
    return TorchEngine(model, shared=shared, speculative=c.speculative, speculative_tokens=c.speculative_tokens,
                       speculative_ngram=c.speculative_ngram)


class RolloutWorker:
    """A policy behind a rollout engine; generates shares of rollout batches (sampled with a seed, or greedy),
    each trajectory in its own environment (posttrain/rollout/multiturn.py; `single_turn`: one generate call).
    `threads`: torch's thread count in this worker's process (a Ray actor); None leaves it as it is. `task`: the
    run's task, for environments that score with its verifier (reflection); None: built from cfg.task when the
    environment is not single_turn."""

    def __init__(self, cfg: RunConfig, model, tokenizer, threads: int | None = None, shared: bool = False,
                 task=None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.stop = stop_token_ids(tokenizer)
        # what a sync sends: the names the learner trains (with model.peft the adapter, else every weight), read
        # before the engine freezes the model; the worker's model is the learner's starting policy, adapter and all
        self.synced_names = frozenset(synced_state_dict(model))
        self.engine = make_engine(cfg, model, tokenizer, shared=shared)
        if task is None and cfg.env.name != "single_turn":
            task = build_task(cfg.task, cfg.seed, cfg.rl.reward_funcs, cfg.rl.reward_weights)
        self.driver = EpisodeDriver.from_config(cfg, tokenizer, task)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, problems: list, seed: int | None) -> RolloutBatch:
        """Trajectories for `problems` in order (a str: a rendered prompt), drawn with
        torch.Generator().manual_seed(seed); seed None: greedy."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.driver.rollout(self.engine.generate, problems, generator=generator, greedy=seed is None)

    def load_weights(self, state_dict: dict[str, Tensor]) -> str:
        """Load the learner's weights (with model.peft the adapter alone, applied by the same peft layers the
        learner trains through: generation and the training forward stay the same computation); returns the
        sha256 of what the engine now holds under the names sent. Any other set of names is refused."""
        if set(state_dict) != self.synced_names:
            missing, extra = sorted(self.synced_names - set(state_dict)), sorted(set(state_dict) - self.synced_names)
            raise WorkerError(f"the weights sent do not fit this rollout worker's model: {len(missing)} of its "
                              f"{len(self.synced_names)} synced tensors missing, {len(extra)} others sent (e.g. "
                              f"{(missing or extra)[0]})")
        return self.engine.load_weights(state_dict)


@dataclass
class RolloutScores:
    """The outcome scores of (a share of) a rollout batch. B = sequences."""

    gold: Tensor  # (B,) the task's verifiable reward
    raw: Tensor  # (B,) the reward model's normalised score, or the gold
    penalty: Tensor  # (B,) the configured shaping added to raw (missing EOS, DAPO's overlong penalty)
    overlong: Tensor  # (B,) the overlong part of `penalty`
    breakdown: RewardBreakdown | None  # data tasks: the per-function breakdown, merged over shares by `merge_breakdowns`


def _shaping(cfg: RunConfig):
    """(lengths (B,), finished (B,)) -> (penalty, overlong), as rl.missing_eos_penalty and DAPO's overlong
    buffer configure it (resolved once)."""
    c = cfg.rl
    buffer = round(c.overlong_buffer_frac * c.max_new_tokens)

    def overlong(lengths: Tensor) -> Tensor:
        if buffer == 0:
            return torch.zeros(len(lengths))
        return overlong_penalty(lengths, c.max_new_tokens, buffer, c.overlong_penalty_factor)

    def shaping(lengths: Tensor, finished: Tensor) -> tuple[Tensor, Tensor]:
        over = overlong(lengths)
        return over - c.missing_eos_penalty * (~finished).float(), over

    return shaping


class RewardWorker:
    """Scores shares of rollout batches: the task's reward (the sandbox for mbpp) and the reward model."""

    def __init__(self, cfg: RunConfig, tokenizer, task, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.tokenizer, self.task = tokenizer, task
        self.reward_model = None
        if cfg.rl.reward == "reward_model":
            from posttrain.models.reward import RewardModel  # noqa: PLC0415 (transformers' heavier classes)

            self.reward_model = RewardModel.load(cfg.rl.reward_model_path)
        self.shaping = _shaping(cfg)
        self.breakdown = breakdown(task)  # task.score, or task.reward without the per-function breakdown

    def pid(self) -> int:
        return os.getpid()

    def score(self, problems: list, batch: RolloutBatch) -> RolloutScores:
        """The gold of each trajectory: its environment's reward where it gave one, else the task's verifier on the
        final assistant turn (the whole response of a single-turn rollout). The per-function breakdown is kept
        when the verifier scored every row. The shaping counts sampled tokens (the loss mask)."""
        prompts = [p.prompt for p in problems]
        gold, breakdown, completions = self.gold(prompts, problems, batch)
        raw = gold if self.reward_model is None else self.reward_model.score(prompts, completions,
                                                                              batch.finished.tolist())
        penalty, over = self.shaping(batch.loss_mask.sum(-1).long(), batch.finished)
        return RolloutScores(gold, raw, penalty, over, breakdown)

    def gold(self, prompts: list[str], problems: list, batch: RolloutBatch
             ) -> tuple[Tensor, RewardBreakdown | None, list[str]]:
        """-> (gold (B,), the verifier's breakdown or None, the final answers)."""
        traj = batch.trajectories
        if traj is None:  # a bare generate batch: the whole response is the answer
            completions = decode_responses(self.tokenizer, batch.response_ids, batch.response_mask)
            env_rewards = [None] * len(batch)
        else:
            completions = [t["answer"] for t in traj]
            env_rewards = [t["reward"] for t in traj]
        need = [i for i, r in enumerate(env_rewards) if r is None]
        if len(need) == len(batch):
            breakdown = self.breakdown(prompts, completions, problems)
            return torch.tensor(breakdown.rewards, dtype=torch.float32), breakdown, completions
        gold = torch.tensor([float("nan") if r is None else r for r in env_rewards], dtype=torch.float32)
        if need:
            part = self.breakdown([prompts[i] for i in need], [completions[i] for i in need],
                                  [problems[i] for i in need])
            gold[need] = torch.tensor(part.rewards, dtype=torch.float32)
        return gold, None, completions


def merge_breakdowns(parts: list[RewardBreakdown | None]) -> dict[str, float]:
    """The reward metrics of the whole batch from its shares' breakdowns (what task.score would report for it)."""
    if not parts or any(p is None or not p.components for p in parts):
        return {}
    rewards = [r for p in parts for r in p.rewards]
    components = {name: [v for p in parts for v in p.components[name]] for name in parts[0].components}
    errors = {name: sum(p.errors[name] for p in parts) for name in parts[0].errors}
    return reward_metrics(rewards, components, errors)
