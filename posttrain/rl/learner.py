"""The learner role: the actor (and critic) update on a rollout batch's experience, data-parallel over M shares.

Every rank holds the same `LearnerState` (policy, reference, critic, optimizers, the minibatch-shuffling
generator, all seeded alike) and receives the whole experience. For each minibatch (the same shuffle on every
rank) rank r takes the r-th of M equal row shares and accumulates its gradient with the token and sequence
counts of the whole minibatch (`GlobalShare`). Every aggregation mode is a sum over rows divided by a global
count (posttrain/algos/aggregation.py), so the shares' gradients add up to the minibatch's gradient; the
`reduce` hook (an all-reduce SUM over the Ray ranks, nothing in one process) gives every rank that sum, and each
rank takes the same clipped step, so their weights stay identical (checked by checksum after every update).

    loss(minibatch) = sum_r sum_{rows of share r} l / N_global   =>   grad = sum_r grad_r

One `Learner` computes one share (a Ray rank) or all M shares in turn (in one process: its gradient
accumulates g_0 + g_1 + ..., which for M = 2 is bitwise what a two-rank all-reduce returns).

Per minibatch, one actor step: the policy loss [x the rollout correction's weight w_t(pi_old / pi_rollout)]
[+ beta * KL_t (kl_placement "loss")] [- entropy_coef * entropy], reduced by `aggregate`, accumulated over
micro-batches, + ptx_coef * the next-token loss on a ptx minibatch (rank 0); invariant: the ratio is 1 on the first
minibatch. Then one critic step (value loss). Every update also measures the rollout/trainer mismatch of its batch
(log pi_old, the trainer's, against log pi_rollout, the engine's: posttrain/algos/rollout_correction.py).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from posttrain.algos import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS, VALUE_LOSSES, aggregate,
                             masked_mean)
from posttrain.algos.rollout_correction import LEVELS, correction_metrics, rollout_mismatch
from posttrain.batch import RolloutBatch, map_micro_batches
from posttrain.buffer import Experience, ExperienceBuffer
from posttrain.config import RLConfig, RunConfig
from posttrain.data.text import PtxSampler, load_ptx_texts
from posttrain.errors import ModelLoadError
from posttrain.invariants import check_ratio_is_one
from posttrain.models.adapters import (AdapterOff, load_trainable_state_dict, reference_of, synced_state_dict,
                                       trainable_state_dict)
from posttrain.models.logprobs import response_logprobs
from posttrain.models.packed import weights_fixed
from posttrain.models.precision import recompute_old_logprobs
from posttrain.models.reward import RewardModel
from posttrain.models.value import critic_from_policy, response_values, scalar_model_from_pretrained
from posttrain.rollout.engines import state_dict_sha256
from posttrain.train.checkpoint import global_rng_state, set_global_rng_state
from posttrain.train.losses import sft_loss
from posttrain.train.optim import clipped_step, make_optimizer


def _no_kl(loss_tok: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, beta: float) -> Tensor:
    return loss_tok


def _no_entropy_bonus(loss_tok: Tensor, entropy: Tensor) -> Tensor:
    return loss_tok


def _no_correction(loss_tok: Tensor, old: Tensor, rollout: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    return loss_tok, {}


def _rollout_correction(c: RLConfig):
    """(loss_tok, old_logprobs, rollout_logprobs, loss_mask) -> (w * loss_tok, metrics): rl.rollout_correction at
    rl.rollout_correction_level with cap rl.rollout_correction_cap (posttrain/algos/rollout_correction.py)."""
    if c.rollout_correction == "none":
        return _no_correction
    weigh, level = ROLLOUT_CORRECTIONS.get(c.rollout_correction), LEVELS[c.rollout_correction_level]

    def correct(loss_tok: Tensor, old: Tensor, rollout: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        log_ratio = level(old, rollout, mask)
        weights = weigh(log_ratio, mask, cap=c.rollout_correction_cap)
        return loss_tok * weights, correction_metrics(weights, log_ratio, mask)

    return correct


@dataclass(frozen=True)
class ActorLoss:
    """The actor's per-token loss as cfg.rl selects it, resolved once:
    l_t = w_t policy_loss_t [+ beta * KL_t(pi || pi_ref)] [- entropy_coef * H_t], reduced by `reduce`; w_t the
    rollout correction's weight (1: none)."""

    policy_loss: Callable  # (logprobs, old_logprobs, advantages, loss_mask) -> (loss (B, T), metrics)
    # (loss_tok, old_logprobs, rollout_logprobs, loss_mask) -> (loss_tok, metrics): the rollout correction or nothing
    correction: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, dict]]
    kl_term: Callable[[Tensor, Tensor, Tensor | None, float], Tensor]  # (loss_tok, logprobs, ref, beta) -> loss_tok
    entropy_term: Callable[[Tensor, Tensor], Tensor]  # (loss_tok, entropy) -> loss_tok
    reduce: Callable  # (loss_tok, loss_mask, global_num_tokens=, global_num_seqs=) -> scalar

    @classmethod
    def from_config(cls, c: RLConfig) -> "ActorLoss":
        kl_fn = KL_ESTIMATORS.get(c.kl_estimator)
        kl_term = ((lambda loss_tok, logprobs, ref, beta: loss_tok + beta * kl_fn(logprobs, ref))
                   if c.kl_placement == "loss" and c.kl_coef > 0 else _no_kl)
        entropy_term = ((lambda loss_tok, entropy: loss_tok - c.entropy_coef * entropy) if c.entropy_coef > 0
                        else _no_entropy_bonus)
        return cls(partial(POLICY_LOSSES.get(c.policy_loss), clip_eps_low=c.clip_eps_low,
                           clip_eps_high=c.clip_eps_high, dual_clip_c=c.dual_clip_c, sapo_tau_pos=c.sapo_tau_pos,
                           sapo_tau_neg=c.sapo_tau_neg),
                   _rollout_correction(c), kl_term, entropy_term,
                   partial(aggregate, mode=c.loss_agg, norm_constant=float(c.max_new_tokens)))


@dataclass
class LearnerState:
    policy: torch.nn.Module  # the actor
    reference: torch.nn.Module | AdapterOff | None  # the starting policy, frozen (a copy, or a LoRA policy with
    # its adapter switched off); None when kl_coef == 0
    critic: torch.nn.Module | None  # scalar-head value model; None unless the estimator needs values
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    critic_optimizer: torch.optim.Optimizer | None
    critic_scheduler: torch.optim.lr_scheduler.LambdaLR | None
    ptx: PtxSampler | None
    buffer: ExperienceBuffer
    sampler: torch.Generator  # minibatch shuffling
    actor_loss: ActorLoss
    recompute_old_logprobs: bool = False  # model.dtype bf16: log pi_old from the trainer (trainer_old_logprobs)
    kl_coef: float = 0.0  # beta of this update, from the loop's KL controller


def _same_vocab(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _critic(c: RLConfig, policy, tokenizer):
    """The critic the estimator needs (None for the critic-free ones): from the reward model or the policy."""
    if "values" not in ADVANTAGES.requires(c.advantage):
        return None
    if c.critic_init == "reward_model" or (c.critic_init == "auto" and c.reward_model_path is not None):
        if not _same_vocab(RewardModel.load(c.reward_model_path).tokenizer, tokenizer):
            raise ModelLoadError(f"rl.critic_init=reward_model: the reward model in {c.reward_model_path} "
                                 "does not share the policy's tokenizer; use rl.critic_init=policy")
        return scalar_model_from_pretrained(c.reward_model_path, tokenizer.pad_token_id).eval()
    return critic_from_policy(policy).eval()  # eval: no dropout, as the policy


def setup_learner(cfg: RunConfig, policy, tokenizer, task) -> LearnerState:
    """The learner's state for `policy` (trained in place): reference, critic, optimizers, ptx data."""
    c = cfg.rl
    reference = reference_of(policy) if c.kl_coef > 0 else None  # a LoRA policy: itself, adapter off
    critic = _critic(c, policy, tokenizer)
    critic_opt = critic_sched = None
    if critic is not None:
        critic_opt, critic_sched = make_optimizer(critic, c.critic_lr, c.weight_decay, c.warmup_steps, c.steps)
    opt, sched = make_optimizer(policy, c.lr, c.weight_decay, c.warmup_steps, c.steps)
    ptx = None
    if c.ptx_coef > 0:
        rng = random.Random(f"ptx-demos-{cfg.seed}")
        data = ([(p.prompt, task.demonstration(p, rng)) for p in task.train_problems] if c.ptx_data == "task"
                else load_ptx_texts(c.ptx_data))
        ptx = PtxSampler(data, cfg.seed)
    return LearnerState(policy, reference, critic, tokenizer, opt, sched, critic_opt, critic_sched, ptx,
                        ExperienceBuffer(tokenizer.pad_token_id), torch.Generator().manual_seed(cfg.seed),
                        ActorLoss.from_config(c), recompute_old_logprobs(cfg.model), c.kl_coef)


class GlobalShare:
    """Rows [r*k, (r+1)*k) of a minibatch (k = len/M) that report the whole minibatch's `num_tokens` and
    `num_seqs`, so that the losses normalise by the global batch. Its micro-batches (`split`) are plain
    `Experience` rows with their own counts (their share of the metrics)."""

    def __init__(self, mb: Experience, r: int, world: int):
        k = len(mb) // world
        self.rows = mb if world == 1 else mb.select(slice(r * k, (r + 1) * k))
        self.num_tokens, self.num_seqs = mb.num_tokens, mb.num_seqs  # scalars of the whole minibatch

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, size: int | None) -> list[Experience]:
        return self.rows.split(size)


def actor_backward(cfg: RunConfig, state: LearnerState, mb: Experience | GlobalShare,
                   ptx_batch: tuple[list[str], list[str]] | None = None, check_ratio: bool = False,
                   own_old: bool = False) -> dict[str, float]:
    """Accumulate the actor's gradient for one minibatch (no optimizer step); returns its metrics.

    loss = reduce(l_t) over the minibatch (state.actor_loss), summed exactly over micro-batches (global token and
    sequence counts), + ptx_coef * ptx next-token loss. check_ratio: the minibatch is the first on a fresh
    rollout batch, so its ratio must be 1 (checked).

    own_old: log pi_old is this forward's own log-probs, detached (the first minibatch of an update whose
    pi_old the trainer computes: the weights are still the ones it would be computed with, so a separate
    forward pass, `trainer_old_logprobs`, would give the same numbers). They are written into the minibatch's
    old_logprobs (for later epochs and the mismatch metric), and the ratio is exactly 1."""
    c, loss_fn = cfg.rl, state.actor_loss
    n_tok, n_seq = mb.num_tokens, mb.num_seqs
    rows = mb.rows if isinstance(mb, GlobalShare) else mb
    stats: dict[str, float] = {}
    for idx, micro in rows.split_indexed(c.micro_batch_size):
        m = micro.loss_mask
        logprobs, entropy = response_logprobs(state.policy, micro.prompt_ids, micro.prompt_mask, micro.response_ids,
                                              micro.response_mask, temperature=c.temperature, with_entropy=True)
        if own_old:  # as trainer_old_logprobs writes them: the log-probs under the loss mask, 0 elsewhere
            old = logprobs.detach() * m
            rows.old_logprobs[idx] = 0.0
            rows.old_logprobs[idx, :old.size(1)] = old
            micro = replace(micro, old_logprobs=old)
        if check_ratio:
            worst = check_ratio_is_one(logprobs, micro.old_logprobs, m, c.ratio_tolerance)
            stats["first_log_ratio_max"] = max(stats.get("first_log_ratio_max", 0.0), worst)
        loss_tok, metrics = loss_fn.policy_loss(logprobs, micro.old_logprobs, micro.advantages, m)
        loss_tok, corrected = loss_fn.correction(loss_tok, micro.old_logprobs, micro.rollout_logprobs, m)
        metrics.update(corrected)
        loss_tok = loss_fn.entropy_term(loss_fn.kl_term(loss_tok, logprobs, micro.ref_logprobs, state.kl_coef), entropy)
        loss = loss_fn.reduce(loss_tok, m, global_num_tokens=n_tok, global_num_seqs=n_seq)
        loss.backward()
        share = float(micro.num_tokens / n_tok.clamp(min=1))  # token-weighted means over the minibatch
        metrics.update(entropy=masked_mean(entropy.detach(), m))
        for key, value in metrics.items():
            stats[key] = stats.get(key, 0.0) + float(value) * share
        stats["loss"] = stats.get("loss", 0.0) + float(loss.detach())
    if ptx_batch is not None:
        ptx, _ = sft_loss(state.policy, state.tokenizer, *ptx_batch)
        (c.ptx_coef * ptx).backward()
        stats["ptx_loss"] = float(ptx.detach())
    return stats


def critic_backward(cfg: RunConfig, state: LearnerState, mb: Experience | GlobalShare) -> dict[str, float]:
    """Accumulate the critic's gradient for one minibatch: token-mean value loss against the returns."""
    c = cfg.rl
    n_tok = mb.num_tokens
    stats: dict[str, float] = {}
    for micro in mb.split(c.micro_batch_size):
        m = micro.loss_mask
        values = response_values(state.critic, micro.prompt_ids, micro.prompt_mask, micro.response_ids,
                                 micro.response_mask)
        loss_tok, metrics = VALUE_LOSSES.get(c.value_loss)(values, micro.values, micro.returns, m,
                                                           clip_eps=c.value_clip)
        loss = aggregate(loss_tok, m, "token-mean", global_num_tokens=n_tok)
        loss.backward()
        share = float(micro.num_tokens / n_tok.clamp(min=1))
        stats["value_loss"] = stats.get("value_loss", 0.0) + float(loss.detach())
        stats["vf_clip_frac"] = stats.get("vf_clip_frac", 0.0) + float(metrics["vf_clip_frac"]) * share
    return stats



@torch.no_grad()
def trainer_old_logprobs(cfg: RunConfig, state: LearnerState, minibatches: list[Experience], world: int) -> None:
    """log pi_old by the training forward, in exactly the micro-batches of every share that the first epoch's
    update will run (so every row is computed with the same batch-mates and the first minibatch's ratio is 1 to
    the bit), into each minibatch's old_logprobs in place (a tensor of its own: `Learner.update` clones it). For
    reduced precision (model.dtype=bfloat16), where the sampler's log-probs differ from the trainer's by
    rounding, and the rounding depends on what else is in the batch. Every rank computes every share, so that
    later epochs (other shares) see the same log pi_old on every rank."""
    c = cfg.rl
    for mb in minibatches:
        k = len(mb) // world
        for r in range(world):
            rows = GlobalShare(mb, r, world).rows
            old = map_micro_batches(rows, c.micro_batch_size, lambda m: response_logprobs(
                state.policy, m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask,
                temperature=c.temperature)[0]) * rows.loss_mask
            mb.old_logprobs[r * k:r * k + len(rows)] = old


def _to(batch, device):
    """An Experience or RolloutBatch with every tensor on `device`."""
    if device.type == "cpu":
        return batch
    return type(batch)(**{f: None if getattr(batch, f) is None else getattr(batch, f).to(device)
                          for f in type(batch).__dataclass_fields__})


def _no_reduce(model: torch.nn.Module, loss: float) -> float:
    return loss


class Learner:
    """The learner role: one data-parallel rank (shares=[r]) or, in one process, all of them ([0, ..., M-1]).
    `reduce(model, loss) -> loss`: sums the gradients (and the loss) over the ranks in place; the Ray ranks'
    all-reduce once they joined a process group, nothing in one process."""

    def __init__(self, cfg: RunConfig, policy, tokenizer, task, shares: list[int], world: int,
                 threads: int | None = None, device: str = "cpu"):
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg, self.shares, self.world = cfg, list(shares), world
        self.device = torch.device(device)
        self.state = setup_learner(cfg, policy.to(self.device), tokenizer, task)
        for model in (self.state.reference, self.state.critic):  # a critic from the reward model loads on CPU
            if model is not None:
                model.to(self.device)  # in place: the optimizer keeps its parameters
        # Eval mode all along: no dropout, so the training forward pass gives generation's log-probs (the ratio
        # invariant), as TRL's disable_dropout does. Nothing else in a causal LM depends on the mode.
        self.state.policy.eval()
        self.reduce: Callable[[torch.nn.Module, float], float] = _no_reduce

    def pid(self) -> int:
        return os.getpid()

    @torch.no_grad()
    @weights_fixed()
    def forward(self, batches: list[RolloutBatch], recompute_logprobs: bool = False) -> list[dict]:
        """For each of this learner's shares of a rollout batch: log pi_ref (None without a reference), V_old (None
        without a critic) and, for an external engine, log pi_old recomputed by the training forward pass; in the
        update's micro-batches (`map_micro_batches`). No weight changes here (`weights_fixed`)."""
        c, state = self.cfg.rl, self.state
        out = []
        for batch in batches:
            b = _to(batch, self.device)

            def per_token(fn):
                return map_micro_batches(b, c.micro_batch_size, lambda m: fn(
                    m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask))

            ref = (per_token(lambda *a: response_logprobs(state.reference, *a, temperature=c.temperature)[0])
                   if state.reference is not None else None)
            values = per_token(lambda *a: response_values(state.critic, *a)) if state.critic is not None else None
            old = (per_token(lambda *a: response_logprobs(state.policy, *a, temperature=c.temperature)[0])
                   if recompute_logprobs else None)
            out.append({"ref_logprobs": ref, "values": values, "logprobs": old})
        return out

    def gradients(self, mb: Experience, check_ratio: bool = False, ptx_batch=None, own_old: bool = False) -> list[dict]:
        """Accumulate the actor's gradient of this learner's shares of `mb` and reduce it over the ranks (no step);
        returns each share's metrics. The summed gradient is the one `actor_backward` gives for all of `mb`.
        own_old: `actor_backward`'s (mb's old_logprobs written in place, so `mb` stays on this learner's device)."""
        mb = _to(mb, self.device)
        stats = [actor_backward(self.cfg, self.state, GlobalShare(mb, r, self.world), ptx_batch if r == 0 else None,
                                check_ratio=check_ratio, own_old=own_old) for r in self.shares]
        stats[0]["_loss"] = self.reduce(self.state.policy, sum(s["loss"] + s.get("ptx_loss", 0.0) for s in stats))
        return stats

    def update(self, exp: Experience, kl_coef: float) -> dict:
        """ppo_epochs passes over shuffled minibatches of `exp`, one reduced actor (and critic) step per minibatch
        with KL coefficient `kl_coef`; then the schedulers advance. Returns per optimizer step each share's
        metrics and the gradient norms, the skipped steps, the learning rate and the rollout/trainer mismatch of
        the whole batch (`rollout_mismatch`, once log pi_old is final)."""
        cfg, state, c = self.cfg, self.state, self.cfg.rl
        state.kl_coef = kl_coef
        for opt in (state.optimizer, state.critic_optimizer):  # gradients left over from elsewhere (an SFT loop)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        state.buffer.add(_to(exp, self.device))
        first_epoch = state.buffer.minibatches(c.mini_batches, state.sampler)
        # pi_old by the trainer (bf16): the first minibatch's from its own update forward when this learner computes
        # every share (its in-place writes reach the buffer: `_to` keeps tensors already on the device), the rest
        # beforehand
        own = state.recompute_old_logprobs and len(self.shares) == self.world
        if state.recompute_old_logprobs:
            for mb in first_epoch:  # written in place; never the rollout_logprobs tensor
                mb.old_logprobs = mb.old_logprobs.clone()
            with weights_fixed():
                trainer_old_logprobs(cfg, state, first_epoch[1:] if own else first_epoch, self.world)
            state.buffer.replace(first_epoch)  # later epochs draw from the same rows, with these log-probs
        mismatch = None
        steps, skipped = [], 0
        for epoch in range(c.ppo_epochs):
            minibatches = first_epoch if epoch == 0 else state.buffer.minibatches(c.mini_batches, state.sampler)
            for k, mb in enumerate(minibatches):
                ptx_batch = state.ptx.next_batch(c.ptx_batch_size) if state.ptx is not None else None
                with weights_fixed():  # the minibatch's micro-batches; ended before the step changes the weights
                    actor = self.gradients(mb, c.check_invariants and epoch == k == 0, ptx_batch,
                                           own_old=own and epoch == k == 0)
                if mismatch is None:  # once log pi_old is final (after the first minibatch's own forward)
                    mismatch = rollout_mismatch(*(torch.cat([getattr(m, f) for m in first_epoch])
                                                  for f in ("old_logprobs", "rollout_logprobs", "loss_mask")),
                                                threshold=c.rollout_mismatch_threshold)
                grad_norm, ok = clipped_step(state.policy, state.optimizer, c.grad_clip, actor[0].pop("_loss"))
                skipped += not ok
                record = {"actor": actor, "grad_norm": grad_norm}
                if state.critic is not None:
                    shares = [GlobalShare(_to(mb, self.device), r, self.world) for r in self.shares]
                    with weights_fixed():
                        critic = [critic_backward(cfg, state, share) for share in shares]
                    value_loss = self.reduce(state.critic, sum(s["value_loss"] for s in critic))
                    record["critic"] = critic
                    record["critic_grad_norm"], ok = clipped_step(state.critic, state.critic_optimizer, c.grad_clip,
                                                                  value_loss)
                    skipped += not ok
                steps.append(record)
        state.buffer.clear()
        state.scheduler.step()
        if state.critic_scheduler is not None:
            state.critic_scheduler.step()
        return {"steps": steps, "skipped": skipped, "lr": state.scheduler.get_last_lr()[0],
                "mismatch": {key: float(value) for key, value in mismatch.items()}}

    # weights and checkpoints --------------------------------------------------------------------------------
    def checksum(self) -> str:
        """The sha256 of what `weights` sends (every rank must hold the same)."""
        return state_dict_sha256(synced_state_dict(self.state.policy))

    def weights(self) -> tuple[dict[str, Tensor], str]:
        """What a rollout worker needs of the policy (on CPU) and its sha256: every weight (a tied one once), or with
        model.peft the adapter alone (`synced_state_dict`: the base is frozen, and the workers hold it already)."""
        sd = {k: v.detach().to("cpu", copy=True) for k, v in synced_state_dict(self.state.policy).items()}
        return sd, state_dict_sha256(sd)

    def snapshot(self) -> tuple[dict, dict]:
        """Everything this rank needs to continue exactly: ({model: weights}, state), tensors on CPU."""
        s = self.state
        weights = {"policy": trainable_state_dict(s.policy)}  # a LoRA policy: the adapter
        snap = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                "sampler": s.sampler.get_state(), "global_rng": global_rng_state()}
        if s.critic is not None:
            weights["critic"] = s.critic.state_dict()
            snap.update(critic_optimizer=s.critic_optimizer.state_dict(),
                        critic_scheduler=s.critic_scheduler.state_dict())
        if s.ptx is not None:
            snap["ptx"] = s.ptx.state_dict()
        return _cpu(weights), _cpu(snap)

    def restore(self, weights: dict, snap: dict) -> None:
        """Load a `snapshot` into this freshly set-up learner."""
        s = self.state
        load_trainable_state_dict(s.policy, weights["policy"])
        s.optimizer.load_state_dict(snap["optimizer"])
        s.scheduler.load_state_dict(snap["scheduler"])
        s.sampler.set_state(snap["sampler"])
        set_global_rng_state(snap["global_rng"])
        if s.critic is not None:
            s.critic.load_state_dict(weights["critic"])
            s.critic_optimizer.load_state_dict(snap["critic_optimizer"])
            s.critic_scheduler.load_state_dict(snap["critic_scheduler"])
        if s.ptx is not None:
            s.ptx.load_state_dict(snap["ptx"])


def _cpu(tree):
    if isinstance(tree, Tensor):
        return tree.to("cpu")
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def combine_update(results: list[dict]) -> dict[str, float]:
    """The learners' update results -> the update's metrics: per optimizer step the shares' metrics summed in
    share order (first_log_ratio_max: the largest), then averaged over the optimizer steps; the rollout/trainer
    mismatch of the batch (the same on every rank) from rank 0."""
    totals: dict[str, float] = {}
    n_steps = len(results[0]["steps"])
    for i in range(n_steps):
        records = [r["steps"][i] for r in results]
        stats: dict[str, float] = {}
        for part in ("actor", "critic"):
            for share in (s for rec in records for s in rec.get(part, [])):
                for key, value in share.items():
                    if key == "first_log_ratio_max":
                        stats[key] = max(stats.get(key, 0.0), value)
                    else:
                        stats[key] = stats.get(key, 0.0) + value
            if part == "actor":
                stats["grad_norm"] = records[0]["grad_norm"]
            elif "critic_grad_norm" in records[0]:
                stats["critic_grad_norm"] = records[0]["critic_grad_norm"]
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    return {**{key: value / max(n_steps, 1) for key, value in totals.items()}, "skipped_steps": results[0]["skipped"],
            **results[0].get("mismatch", {})}
