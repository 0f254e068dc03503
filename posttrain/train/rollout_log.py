"""The rollout log (rl.log_rollouts_every): a step's trajectories as JSON Lines, to see what happened.

    log = rollout_log_hook(cfg, tokenizer)          once at setup; a no-op when rl.log_rollouts_every is 0
    log(step, batch, scores, gold)                  every step: writes OUTPUT_DIR/rollouts/step_NNNNNN.jsonl on
                                                    the steps that are multiples of rl.log_rollouts_every

One line per trajectory (the batch's row order):

    {"row": 0, "prompt": "...", "segments": [{"role": "assistant", "text": "...", "tokens": 5, "loss": true},
                                             {"role": "tool", "text": "...", "tokens": 9, "loss": false}, ...],
     "answer": "...", "reward": 1.0, "gold": 1.0, "env_reward": null, "turns": 2, "tool_calls": 1,
     "tool_errors": 0, "calls": [{"name": "calculator", "ok": true, "error": null}], "finished": true,
     "truncated": null, "steps": [{...}, ...]}

`text` is the exact decoding of the segment's tokens, special tokens included (what the model read); `loss`
says whether the segment is under the loss mask (sampled tokens) or not (environment tokens). `reward` is the
score the advantages saw (shaping included), `gold` the task's or environment's reward. A batch from a bare
generate call (no trajectories) is one assistant segment per row. The file is written whole, then renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from posttrain.batch import RolloutBatch
from posttrain.config import RunConfig

_KEEP = ("answer", "turns", "tool_calls", "tool_errors", "calls", "finished", "truncated", "steps")


def rollout_records(tokenizer, batch: RolloutBatch, scores: Tensor, gold: Tensor) -> list[dict]:
    """One JSON-able record per row of `batch` (the module docstring's format)."""
    out = []
    prompt_lengths = batch.prompt_mask.sum(-1).tolist()
    for i in range(len(batch)):
        ids = batch.response_ids[i].tolist()
        loss = batch.loss_mask[i].tolist()
        traj = batch.trajectories[i] if batch.trajectories is not None else None
        spans = (traj["segments"] if traj is not None else
                 [{"role": "assistant", "start": 0, "end": int(batch.response_mask[i].sum())}])
        segments = [{"role": s["role"], "text": tokenizer.decode(ids[s["start"]:s["end"]]),
                     "tokens": s["end"] - s["start"], "loss": bool(s["end"] > s["start"] and loss[s["start"]] > 0)}
                    for s in spans]
        prompt = batch.prompt_ids[i, batch.prompt_ids.size(1) - int(prompt_lengths[i]):].tolist()
        record = {"row": i, "prompt": tokenizer.decode(prompt, skip_special_tokens=True), "segments": segments,
                  "reward": float(scores[i]), "gold": float(gold[i])}
        if traj is not None:
            record["env_reward"] = traj["reward"]
            record.update({key: traj[key] for key in _KEEP})
        else:
            record.update(answer=tokenizer.decode(ids[:spans[0]["end"]], skip_special_tokens=True),
                          finished=bool(batch.finished[i]))
        out.append(record)
    return out


def write_rollouts(path: Path, records: list[dict]) -> None:
    """`records` as JSON Lines at `path` (parent made), written to a temporary file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in records)
    os.replace(tmp, path)


def rollout_log_hook(cfg: RunConfig, tokenizer) -> Callable[[int, RolloutBatch, Tensor, Tensor], None]:
    """(step, batch, scores, gold) -> None: writes the step's rollout log every rl.log_rollouts_every steps
    (resolved once: rl.log_rollouts_every 0 gives a function that does nothing)."""
    every = cfg.rl.log_rollouts_every
    root = Path(cfg.output_dir) / "rollouts"

    def nothing(step: int, batch: RolloutBatch, scores: Tensor, gold: Tensor) -> None:
        return None

    def log(step: int, batch: RolloutBatch, scores: Tensor, gold: Tensor) -> None:
        if step % every == 0:
            write_rollouts(root / f"step_{step:06d}.jsonl", rollout_records(tokenizer, batch, scores, gold))

    return log if every else nothing
