"""The data-parallel learner: M ranks whose summed gradient is the single-process gradient of the global batch.

Every rank holds the same `RLState` (`posttrain.recipes.rl.setup_rl`: policy, reference, critic, optimizers,
the minibatch-shuffling generator, all seeded alike) and receives the whole rollout batch. For each minibatch
(the same shuffle on every rank) rank r takes the r-th of M equal row shares and calls the local loop's
`actor_backward` / `critic_backward` on it, with the token and sequence counts of the whole minibatch
(`GlobalShare`). Every aggregation mode is a sum over rows divided by a global count
(posttrain/algos/aggregation.py), so the shares' gradients add up to the minibatch's gradient; one all-reduce
(SUM) of the flattened gradients gives every rank that sum, and each rank takes the same clipped optimizer step
(`_step`), so their weights stay identical (checked by checksum after every update). The ptx term is added
by rank 0 only.

    loss(minibatch) = sum_r sum_{rows of share r} l / N_global   =>   grad = sum_r grad_r   (all-reduce SUM)

A `Learner` computes one share (a Ray rank) or all M shares in turn (the single-process run: its gradient
accumulates g_0 + g_1 + ..., which for M = 2 is bitwise what a two-rank all-reduce returns).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from posttrain.batch import RolloutBatch
from posttrain.buffer import Experience
from posttrain.config import RunConfig
from posttrain.distributed.engines import state_dict_sha256
from posttrain.models.logprobs import response_logprobs
from posttrain.models.value import response_values
from posttrain.recipes.rl import _step, actor_backward, critic_backward, rl_restore, rl_snapshot, setup_rl


class GlobalShare:
    """Rows [r*k, (r+1)*k) of a minibatch (k = len/M) that report the whole minibatch's `num_tokens` and
    `num_seqs`, so that `actor_backward` and `critic_backward` normalise by the global batch. Its micro-batches
    (`split`) are plain `Experience` rows with their own counts (their share of the metrics)."""

    def __init__(self, mb: Experience, r: int, world: int):
        k = len(mb) // world
        self.rows = mb.select(slice(r * k, (r + 1) * k))
        self.num_tokens, self.num_seqs = mb.num_tokens, mb.num_seqs  # scalars of the whole minibatch

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, size: int | None) -> list[Experience]:
        return self.rows.split(size)

    def __getattr__(self, name):
        if name.startswith("_") or name == "rows":
            raise AttributeError(name)
        return getattr(self.rows, name)


def _to(exp, device):
    """An Experience or RolloutBatch with every tensor on `device`."""
    fields = type(exp).__dataclass_fields__
    return type(exp)(**{f: None if getattr(exp, f) is None else getattr(exp, f).to(device) for f in fields})


class Learner:
    """One data-parallel rank (shares=[r]) or, in one process, all of them (shares=[0, ..., M-1])."""

    def __init__(self, cfg: RunConfig, policy, tokenizer, task, shares: list[int], world: int):
        torch.set_num_threads(cfg.ray.threads_per_worker)
        self.cfg, self.shares, self.world = cfg, list(shares), world
        self.device = torch.device("cuda" if cfg.ray.learner_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.state = setup_rl(cfg, policy.to(self.device), tokenizer, task)
        for model in (self.state.reference, self.state.critic):  # a critic from the reward model loads on CPU
            if model is not None:
                model.to(self.device)  # in place: the optimizer keeps its parameters
        self.state.policy.eval()  # as train_rl: no dropout, so the first ratio is 1
        self.group = None

    def pid(self) -> int:
        return os.getpid()

    # process group ----------------------------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: an address and a free port for torch.distributed's TCP rendezvous."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def join(self, host: str, port: int) -> None:
        """Join the M-rank process group (gloo on CPU, NCCL on CUDA); blocks until every rank has joined."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.shares[0],
                                world_size=self.world, timeout=timedelta(seconds=self.cfg.ray.timeout_s))
        self.group = dist.group.WORLD

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group()
            self.group = None

    def _all_reduce(self, model: torch.nn.Module, loss: float) -> float:
        """Sum the gradients (and the loss, for the finiteness check) over the ranks, in place."""
        if self.group is None:
            return loss
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        total = torch.tensor([loss], dtype=torch.float64, device=flat.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total)

    # rollout-time forward passes ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batches: list[RolloutBatch], recompute_logprobs: bool = False) -> list[dict]:
        """For each of this learner's shares of a rollout batch: log pi_ref (None without a reference), V_old (None
        without a critic) and, for an external engine, log pi_old recomputed by the training forward pass."""
        c, state = self.cfg.rl, self.state
        out = []
        for batch in batches:
            b = _to(batch, self.device)
            args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
            ref = (response_logprobs(state.reference, *args, temperature=c.temperature)[0]
                   if state.reference is not None else None)
            values = response_values(state.critic, *args) if state.critic is not None else None
            old = response_logprobs(state.policy, *args, temperature=c.temperature)[0] if recompute_logprobs else None
            out.append({k: None if v is None else v.cpu() for k, v in
                        (("ref_logprobs", ref), ("values", values), ("logprobs", old))})
        return out

    # the update ---------------------------------------------------------------------------------------------
    def gradients(self, mb: Experience, check_ratio: bool = False, ptx_batch=None) -> list[dict]:
        """Accumulate the actor's gradient of this learner's shares of `mb` and all-reduce it (no step);
        returns each share's metrics. The summed gradient is the one actor_backward gives for all of `mb`."""
        mb = _to(mb, self.device)
        stats = [actor_backward(self.cfg, self.state, GlobalShare(mb, r, self.world), ptx_batch if r == 0 else None,
                                check_ratio=check_ratio) for r in self.shares]
        stats[0]["_loss"] = self._all_reduce(self.state.policy, sum(s["loss"] + s.get("ptx_loss", 0.0) for s in stats))
        return stats

    def gradient_of(self, mb: Experience) -> dict[str, torch.Tensor]:
        """The all-reduced actor gradient of minibatch `mb` by parameter name (no step; cleared again). Tests."""
        self.state.optimizer.zero_grad(set_to_none=True)
        self.gradients(mb)
        out = {n: p.grad.detach().cpu().clone() for n, p in self.state.policy.named_parameters() if p.grad is not None}
        self.state.optimizer.zero_grad(set_to_none=True)
        return out

    def update(self, exp: Experience, kl: float | None, n_seqs: int) -> dict:
        """rl.update on this learner's shares: ppo_epochs passes over shuffled minibatches, one all-reduced actor
        (and critic) step per minibatch; then the schedulers and the KL controller advance as in rl_step.
        Returns per optimizer step each share's metrics and the gradient norms, the skipped steps and the lr."""
        cfg, state, c = self.cfg, self.state, self.cfg.rl
        for opt in (state.optimizer, state.critic_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        state.buffer.add(_to(exp, self.device))
        steps, skipped = [], 0
        for epoch in range(c.ppo_epochs):
            for k, mb in enumerate(state.buffer.minibatches(c.mini_batches, state.sampler)):
                ptx_batch = state.ptx.next_batch(c.ptx_batch_size) if state.ptx is not None else None
                actor = self.gradients(mb, c.check_invariants and epoch == k == 0, ptx_batch)
                grad_norm, ok = _step(state.policy, state.optimizer, c.grad_clip, actor[0].pop("_loss"))
                skipped += not ok
                record = {"actor": actor, "grad_norm": grad_norm}
                if state.critic is not None:
                    critic = [critic_backward(cfg, state, GlobalShare(mb, r, self.world)) for r in self.shares]
                    value_loss = self._all_reduce(state.critic, sum(s["value_loss"] for s in critic))
                    record["critic"] = critic
                    record["critic_grad_norm"], ok = _step(state.critic, state.critic_optimizer, c.grad_clip,
                                                           value_loss)
                    skipped += not ok
                steps.append(record)
        state.buffer.clear()
        state.scheduler.step()
        if state.critic_scheduler is not None:
            state.critic_scheduler.step()
        if kl is not None:
            state.kl_ctl.update(kl, n_steps=n_seqs)
        return {"steps": steps, "skipped": skipped, "lr": state.scheduler.get_last_lr()[0]}

    # weights and checkpoints --------------------------------------------------------------------------------
    def checksum(self) -> str:
        return state_dict_sha256(self.state.policy.state_dict())

    def weights(self) -> tuple[dict[str, torch.Tensor], str]:
        """The policy's weights (on CPU) and their sha256."""
        sd = {k: v.detach().to("cpu", copy=True) for k, v in self.state.policy.state_dict().items()}
        return sd, state_dict_sha256(sd)

    def snapshot(self, accuracy: float) -> tuple[dict, dict]:
        """rl_snapshot of this rank (its tensors on CPU)."""
        weights, snap = rl_snapshot(self.state, accuracy)
        return _cpu(weights), _cpu(snap)

    def restore(self, weights: dict, snap: dict) -> float:
        return rl_restore(self.state, weights, snap)


def _cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.to("cpu")
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def combine_update(results: list[dict]) -> dict[str, float]:
    """The learners' update results -> the metrics rl.update reports: per optimizer step the shares' metrics
    summed in share order (first_log_ratio_max: the largest), then averaged over the optimizer steps."""
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
    return {**{key: value / max(n_steps, 1) for key, value in totals.items()}, "skipped_steps": results[0]["skipped"]}
