"""The rollout and reward roles of the RL loop: plain classes, run in this process (roles.InlineRoles) or as
Ray actors (posttrain/distributed), with the same code either way.

    RolloutWorker.generate(prompts, seed)      -> RolloutBatch     (a policy behind a rollout engine)
    RewardWorker.score(problems, batch)        -> RolloutScores    (the task's reward, a reward model, shaping)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos.shaping import overlong_penalty
from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig
from posttrain.models.chat import decode_responses, encode_prompts, stop_token_ids
from posttrain.rewards.base import RewardBreakdown, reward_metrics
from posttrain.rollout.engines import RolloutEngine, TorchEngine
from posttrain.tasks.registry import breakdown


def make_engine(cfg: RunConfig, model, tokenizer, shared: bool = False) -> RolloutEngine:
    """The rollout engine `ray.engine` names, holding `model` (`shared`: see TorchEngine)."""
    if cfg.ray.engine == "vllm":
        from posttrain.rollout.vllm_engine import VLLMEngine  # noqa: PLC0415 (optional extra)

        return VLLMEngine(model, tokenizer, seed=cfg.seed, gpu_memory_utilization=cfg.ray.vllm_gpu_memory_utilization,
                          dtype=cfg.ray.vllm_dtype)
    return TorchEngine(model, shared=shared)


class RolloutWorker:
    """A policy behind a rollout engine; generates shares of rollout batches (sampled with a seed, or greedy).
    `threads`: torch's thread count in this worker's process (a Ray actor); None leaves it as it is."""

    def __init__(self, cfg: RunConfig, model, tokenizer, threads: int | None = None, shared: bool = False):
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.stop = stop_token_ids(tokenizer)
        self.engine = make_engine(cfg, model, tokenizer, shared=shared)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: list[str], seed: int | None) -> RolloutBatch:
        """Samples for `prompts` in order, drawn with torch.Generator().manual_seed(seed); seed None: greedy."""
        c = self.cfg.rl
        ids, mask = encode_prompts(self.tokenizer, prompts)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.engine.generate(ids, mask, max_new_tokens=c.max_new_tokens, eos_token_id=self.stop,
                                    pad_token_id=self.tokenizer.pad_token_id, temperature=c.temperature,
                                    top_k=c.top_k, top_p=c.top_p, greedy=seed is None, generator=generator)

    def load_weights(self, state_dict: dict[str, Tensor]) -> str:
        """Load the learner's weights; returns the sha256 of what the engine now holds."""
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
        prompts = [p.prompt for p in problems]
        completions = decode_responses(self.tokenizer, batch.response_ids, batch.response_mask)
        breakdown = self.breakdown(prompts, completions, problems)
        gold = torch.tensor(breakdown.rewards, dtype=torch.float32)
        raw = gold if self.reward_model is None else self.reward_model.score(prompts, completions,
                                                                              batch.finished.tolist())
        penalty, over = self.shaping(batch.response_lengths, batch.finished)
        return RolloutScores(gold, raw, penalty, over, breakdown)


def merge_breakdowns(parts: list[RewardBreakdown | None]) -> dict[str, float]:
    """The reward metrics of the whole batch from its shares' breakdowns (what task.score would report for it)."""
    if not parts or any(p is None or not p.components for p in parts):
        return {}
    rewards = [r for p in parts for r in p.rewards]
    components = {name: [v for p in parts for v in p.components[name]] for name in parts[0].components}
    errors = {name: sum(p.errors[name] for p in parts) for name in parts[0].errors}
    return reward_metrics(rewards, components, errors)
