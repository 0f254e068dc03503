"""The rollout driver: trajectories of a share of problems, every live one sampled in one `generate` call per
turn, the environment's observations appended as token ids in between (token-in, token-out).

    driver = EpisodeDriver.from_config(cfg, tokenizer, task)          once per rollout worker
    batch = driver.rollout(engine.generate, problems, generator=g)    -> RolloutBatch

Per trajectory (B rows):

    prompt      encode(env.reset(problem))                      the prompt ids, left-padded as before
    response    [turn 1 sampled][obs 1][turn 2 sampled]...      response_ids (B, T), right-padded
    masks       response_mask 1 on every response token; loss_mask 1 on the sampled ones only (the observation
                tokens are context: holes in the loss mask); rollout_logprobs from the sampling pass, 0 on
                observation tokens
    finished    the environment said done after a complete turn; False when a limit cut it (`trajectories[i]
                ["truncated"]` says which: max_new_tokens (a turn without its stop token), max_turns,
                max_tool_calls, max_response_tokens)

Turn k samples, for every live row, from its ids so far (prompt + response), left-padded: the context the
training forward pass sees for the same tokens, so log pi_old from the sampler equals the trainer's (the
loop's ratio invariant). A turn ends at the stop ids (EOS / the template's end-of-turn token, kept in the
response). With one turn (`SingleTurn`) this is exactly one `generate` call on the encoded prompts with
rl.max_new_tokens: the same tokens, log-probs and random stream as a plain generate call.

`trajectories[i]` (posttrain.batch.Trajectories) is plain data for the reward worker, the metrics and the
rollout log: answer (the final assistant turn's text), reward (the environment's, or None), turns, tool_calls,
tool_errors, calls, finished, truncated, segments ([{role, start, end}] over response positions), steps (each
`env.step`'s Observation.info, in order), decode (the speculative decoder's counts summed over the trajectory's
turns, a posttrain.batch.DecodeCounts record whose `rows` counts its generate calls; None when the engine
reports none: plain decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.batch import RolloutBatch, Trajectories, left_pad, right_pad
from posttrain.config import RunConfig
from posttrain.models.chat import encode_texts, stop_token_ids, uses_chat_template
from posttrain.rollout.env import (
    EnvContext,
    Observation,
    cut_message,
    env_factory,
    observation_ids,
    opening_text,
)
from posttrain.rollout.speculative import speculative_metrics, sum_counts

TRUNCATIONS = ("max_new_tokens", "max_turns", "max_tool_calls", "max_response_tokens")


@dataclass(frozen=True)
class Prompt:
    """A bare prompt string as a problem (callers that pass rendered prompts, not the task's problems)."""

    prompt: str


@dataclass
class _Row:
    """One trajectory while it is sampled."""

    prompt: list[int]
    ids: list[int]
    logprobs: list[float]
    sampled: list[float]  # 1.0 on sampled tokens, 0.0 on observation tokens
    record: dict


def _record() -> dict:
    return {"answer": "", "reward": None, "turns": 0, "tool_calls": 0, "tool_errors": 0, "calls": [],
            "finished": False, "truncated": None, "segments": [], "steps": [], "decode": None}


def add_counts(total: dict | None, counts: dict | None) -> dict | None:
    """A trajectory's decoder counts so far plus one generate call's for its row (DecodeCounts records; None:
    none reported)."""
    if counts is None:
        return total
    return dict(counts) if total is None else {key: total[key] + counts[key] for key in total}


@dataclass(frozen=True)
class EpisodeDriver:
    """What a rollout worker's driver needs, resolved once (`from_config`)."""

    make_env: Callable[[], object]  # () -> a fresh environment (posttrain.rollout.env.env_factory)
    tokenizer: object
    chat: bool
    stop_ids: list[int]
    max_new_tokens: int  # rl.max_new_tokens: the longest assistant turn
    max_turns: int
    max_tool_calls: int
    max_response_tokens: float  # env.max_response_tokens, inf for none
    max_observation_chars: int
    sampling: dict  # temperature, top_k, top_p for `generate`

    @classmethod
    def from_config(cls, cfg: RunConfig, tokenizer, task=None) -> EpisodeDriver:
        e, c = cfg.env, cfg.rl
        chat = uses_chat_template(tokenizer, cfg.task.chat_template)
        make_env = env_factory(EnvContext(e, task, tokenizer, chat))
        return cls(make_env, tokenizer, chat, stop_token_ids(tokenizer), c.max_new_tokens, e.max_turns,
                   e.max_tool_calls, math.inf if e.max_response_tokens is None else e.max_response_tokens,
                   e.max_observation_chars, {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p})

    def rollout(self, generate: Callable[..., RolloutBatch], problems: list, *, generator=None,
                greedy: bool = False) -> RolloutBatch:
        """Trajectories for `problems` in order (a str is taken as a rendered prompt); `generate` is an engine's
        generate (posttrain.rollout.generate.generate's signature)."""
        problems = [Prompt(p) if isinstance(p, str) else p for p in problems]
        envs = [self.make_env() for _ in problems]
        try:
            texts = [opening_text(self.tokenizer, env.reset(p), self.chat) for env, p in zip(envs, problems)]
            rows = [_Row(ids, [], [], [], _record()) for ids in encode_texts(self.tokenizer, texts)]
            live = list(range(len(rows)))
            for turn in range(self.max_turns):
                if not live:
                    break
                live = self._turn(generate, envs, rows, live, turn, generator, greedy)
        finally:
            for env in envs:
                close = getattr(env, "close", None)
                if close is not None:
                    close()
        return self._batch(rows)

    def _turn(self, generate, envs, rows: list[_Row], live: list[int], turn: int, generator, greedy) -> list[int]:
        """Sample one assistant turn for every live row, step their environments; the rows still live after."""
        pad = self.tokenizer.pad_token_id
        room = {i: self.max_response_tokens - len(rows[i].ids) for i in live}
        n_new = int(min(self.max_new_tokens, max(room.values())))
        ids, mask = left_pad([rows[i].prompt + rows[i].ids for i in live], pad)
        out = generate(ids, mask, max_new_tokens=n_new, eos_token_id=self.stop_ids, pad_token_id=pad,
                       greedy=greedy, generator=generator, **self.sampling)
        lengths = out.response_mask.sum(-1).long().tolist()
        counts = out.decode_counts or [None] * len(live)  # the engine's per-row counts (speculative decoding)
        still = []
        for k, i in enumerate(live):
            row, rec = rows[i], rows[i].record
            n = lengths[k]
            tokens, logps = out.response_ids[k, :n].tolist(), out.rollout_logprobs[k, :n].tolist()
            complete = bool(out.finished[k])
            if n > room[i]:  # past env.max_response_tokens: cut (the cut tokens are not part of the trajectory)
                tokens, logps, complete = tokens[:int(room[i])], logps[:int(room[i])], False
            start = len(row.ids)
            row.ids += tokens
            row.logprobs += logps
            row.sampled += [1.0] * len(tokens)
            rec["segments"].append({"role": "assistant", "start": start, "end": len(row.ids)})
            rec["turns"] += 1
            rec["decode"] = add_counts(rec["decode"], counts[k])
            rec["answer"] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not complete:
                rec["truncated"] = "max_response_tokens" if n >= room[i] else "max_new_tokens"
                continue
            obs = envs[i].step(rec["answer"])
            if self._observe(row, obs, turn):
                still.append(i)
        return still

    def _observe(self, row: _Row, obs: Observation, turn: int) -> bool:
        """Record `obs` and append its tokens; True when the trajectory goes on to another turn."""
        rec, info = row.record, obs.info or {}
        rec["tool_calls"] += int(info.get("tool_calls", 0))
        rec["tool_errors"] += int(info.get("tool_errors", 0))
        rec["calls"] += list(info.get("calls", []))
        rec["steps"].append(dict(info))
        if obs.done:
            rec["finished"] = True
            rec["reward"] = None if obs.reward is None else float(obs.reward)
            return False
        if rec["tool_calls"] > self.max_tool_calls:
            rec["truncated"] = "max_tool_calls"
            return False
        if turn == self.max_turns - 1:
            rec["truncated"] = "max_turns"
            return False
        messages = [cut_message(m, self.max_observation_chars) for m in obs.messages]
        extra = observation_ids(self.tokenizer, messages, self.chat)
        if len(row.ids) + len(extra) >= self.max_response_tokens:  # no room left for a token of the next turn
            rec["truncated"] = "max_response_tokens"
            return False
        start = len(row.ids)
        row.ids += extra
        row.logprobs += [0.0] * len(extra)
        row.sampled += [0.0] * len(extra)
        roles = ",".join(dict.fromkeys(str(m.get("role", "")) for m in messages))
        rec["segments"].append({"role": roles or "environment", "start": start, "end": len(row.ids)})
        return True

    def _batch(self, rows: list[_Row]) -> RolloutBatch:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([r.prompt for r in rows], pad)
        response_ids, response_mask = right_pad([r.ids for r in rows], pad)
        T = response_ids.size(1)
        logprobs = torch.tensor([r.logprobs + [0.0] * (T - len(r.ids)) for r in rows], dtype=torch.float32)
        loss_mask = torch.tensor([r.sampled + [0.0] * (T - len(r.ids)) for r in rows], dtype=torch.float32)
        finished = torch.tensor([r.record["finished"] for r in rows], dtype=torch.bool)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, logprobs, finished,
                            loss_mask=loss_mask, trajectories=Trajectories(r.record for r in rows))


def trajectory_metrics(trajectories: Trajectories | None) -> dict[str, float]:
    """The step's environment metrics (docs/metrics.md) over its trajectories: env/turns, env/tool_calls and
    env/tool_errors (means per trajectory), env/truncated_<reason> (the share cut by each limit); with speculative
    decoding rollout/spec_* (`speculative_metrics` of the counts summed over every trajectory). {} for a batch
    without trajectories."""
    if not trajectories:
        return {}
    n = len(trajectories)
    out = {f"env/{key}": sum(t[key] for t in trajectories) / n for key in ("turns", "tool_calls", "tool_errors")}
    out.update({f"env/truncated_{why}": sum(t["truncated"] == why for t in trajectories) / n for why in TRUNCATIONS})
    decoded = [t["decode"] for t in trajectories if t.get("decode") is not None]  # .get: records checkpointed before
    if decoded:
        out.update(speculative_metrics(sum_counts(decoded)))
    return out
