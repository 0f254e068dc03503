"""The rollout and reward workers: plain classes, run as Ray actors (pool.py) or in this process.

A rollout worker holds a policy copy behind a rollout engine and generates shares of rollout batches; a
reward worker scores them with `posttrain.recipes.experience.score`, the function the local loop calls, so
the outcome scores, the missing-EOS and overlong shaping and the reward model are the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.recipes.common import encode_prompts
from posttrain.recipes.experience import score
from posttrain.rewards.base import Scores, reward_metrics


def make_engine(cfg: RunConfig, model, tokenizer):
    """The rollout engine `ray.engine` names, holding `model`."""
    if cfg.ray.engine == "vllm":
        from posttrain.distributed.vllm_engine import VLLMEngine  # noqa: PLC0415 (optional extra)

        return VLLMEngine(model, tokenizer, seed=cfg.seed, gpu_memory_utilization=cfg.ray.vllm_gpu_memory_utilization,
                          dtype=cfg.ray.vllm_dtype)
    from posttrain.distributed.engines import TorchEngine  # noqa: PLC0415

    return TorchEngine(model)


class RolloutWorker:
    """A policy copy that generates shares of rollout batches (sampled with a given seed, or greedy)."""

    def __init__(self, cfg: RunConfig, model, tokenizer):
        torch.set_num_threads(cfg.ray.threads_per_worker)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.engine = make_engine(cfg, model, tokenizer)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: list[str], seed: int | None) -> RolloutBatch:
        """Samples for `prompts` in order, drawn with torch.Generator().manual_seed(seed); seed None: greedy.
        The same call as posttrain.recipes.experience.rollout, with this worker's policy and generator."""
        c = self.cfg.rl
        ids, mask = encode_prompts(self.tokenizer, prompts)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        tok = self.tokenizer
        return self.engine.generate(ids, mask, max_new_tokens=c.max_new_tokens, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, temperature=c.temperature, top_k=c.top_k,
                                    top_p=c.top_p, greedy=seed is None, generator=generator)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> str:
        """Load the learner's weights; returns the sha256 of what the engine now holds."""
        return self.engine.load_weights(state_dict)


@dataclass
class ShardScores:
    """The scores of one share of a rollout batch. B = sequences in the share."""

    gold: torch.Tensor  # (B,) the task's verifiable reward
    raw: torch.Tensor  # (B,) the reward model's normalised score, or the gold
    scores: torch.Tensor  # (B,) raw with the configured shaping: what the advantages see
    task_scores: Scores | None  # data tasks: the per-function breakdown, merged over shares by merge_task_scores


class _RecordingTask:
    """The task as `score` sees it, keeping the last `task.score(...)` breakdown (data tasks) for the driver."""

    def __init__(self, task):
        self._task, self.last = task, None
        if hasattr(task, "score"):
            self.score = self._score

    def _score(self, *args, **kw) -> Scores:
        self.last = self._task.score(*args, **kw)
        return self.last

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._task, name)


class RewardWorker:
    """Scores shares of rollout batches: the task's reward (the sandbox for mbpp) and the reward model."""

    def __init__(self, cfg: RunConfig, tokenizer, task):
        torch.set_num_threads(cfg.ray.threads_per_worker)
        reward_model = None
        if cfg.rl.reward == "reward_model":
            from posttrain.models.reward import RewardModel  # noqa: PLC0415

            reward_model = RewardModel.load(cfg.rl.reward_model_path)
        self.cfg = cfg
        self.state = SimpleNamespace(tokenizer=tokenizer, task=_RecordingTask(task), reward_model=reward_model)

    def pid(self) -> int:
        return os.getpid()

    def score(self, problems: list, batch: RolloutBatch) -> ShardScores:
        self.state.task.last = None
        scored = score(self.cfg, self.state, problems, batch)
        return ShardScores(scored.gold, scored.raw, scored.scores, self.state.task.last)


def merge_task_scores(parts: list[Scores | None]) -> dict[str, float]:
    """The reward metrics of the whole batch from its shares' breakdowns (what task.score would report for it)."""
    if not parts or any(p is None for p in parts):
        return {}
    rewards = [r for p in parts for r in p.rewards]
    components = {name: [v for p in parts for v in p.components[name]] for name in parts[0].components}
    errors = {name: sum(p.errors[name] for p in parts) for name in parts[0].errors}
    return reward_metrics(rewards, components, errors)
