"""The rollout/trainer mismatch in the loop: the log-probs the rollout engine returned (rollout_logprobs) kept apart
from the trainer's (old_logprobs), the mismatch logged every step, and the rollout correction a no-op where the
two are the same numbers (posttrain's engine in fp32) and the plain-loop weights where they differ."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from posttrain.models import build_tiny_model
from posttrain.rl.loop import RLRun
from posttrain.rl.roles import InlineRoles
from tests.recipes.test_rl import EvenFirstCharTask, snapshot

# |noise| is 0.05 away from the 0.1 threshold, so the count over it is exact; five values, so that the sums over a
# row's (up to 4) tokens differ from row to row and the sequence-level ratios cross the cap too
NOISE = (-0.3, -0.05, 0.05, 0.3, -0.3)


def known_noise(mask: torch.Tensor) -> torch.Tensor:
    """A fixed pattern of NOISE values on the mask's tokens."""
    i, t = torch.meshgrid(torch.arange(mask.size(0)), torch.arange(mask.size(1)), indexing="ij")
    return torch.tensor(NOISE)[(7 * i + t) % len(NOISE)] * mask


def one_step(cfg, model_cfg, tokenizer, noisy: bool = False):
    """One rollout step from the same starting weights; with `noisy`, the rollout engine's log-probs are off by
    `known_noise` and the trainer recomputes log pi_old (as for an external engine). -> (metrics, weights,
    the noise of the batch, its loss mask)."""
    model = build_tiny_model(model_cfg, tokenizer, seed=0)
    task = EvenFirstCharTask(cfg.task, cfg.seed)
    roles = InlineRoles.local(cfg, model, tokenizer, task)
    seen = {}
    if noisy:
        engine = roles.rollout_workers.workers[0].engine
        clean = engine.generate

        def generate(*args, **kwargs):
            batch = clean(*args, **kwargs)
            seen["noise"], seen["mask"] = known_noise(batch.loss_mask), batch.loss_mask
            return dataclasses.replace(batch, rollout_logprobs=batch.rollout_logprobs + seen["noise"],
                                       old_logprobs=None)

        engine.generate = generate
        roles.recompute_in_forward = True
    metrics = RLRun.create(cfg, roles, task).step()
    return metrics, snapshot(model), seen.get("noise"), seen.get("mask")


CORRECTIONS = [("tis", "token"), ("mis", "sequence"), ("icepop", "token"), ("tis", "sequence")]


def test_the_in_process_engine_logs_no_mismatch_and_the_correction_changes_no_bit(tmp_path, make_config,
                                                                                  tiny_model_cfg, tokenizer):
    """posttrain's engine in fp32 is the trainer's forward: old_logprobs are the rollout's, so every weight is 1
    and the corrected run equals the uncorrected one bit for bit (also over two epochs of two minibatches)."""
    args = ("rl.mini_batches=2", "rl.ppo_epochs=2")
    base, weights, _, _ = one_step(make_config(tmp_path, *args), tiny_model_cfg, tokenizer)
    assert base["rollout_kl"] == base["rollout_logprob_diff_max"] == base["rollout_logprob_diff_frac"] == 0.0
    for name, level in CORRECTIONS:
        cfg = make_config(tmp_path, *args, f"rl.rollout_correction={name}", f"rl.rollout_correction_level={level}")
        got, w, _, _ = one_step(cfg, tiny_model_cfg, tokenizer)
        assert got["loss"] == base["loss"] and got["grad_norm"] == base["grad_norm"], name
        assert all(torch.equal(w[k], weights[k]) for k in weights), name
        assert got["rollout_is_weight_mean"] == 1.0 and got["rollout_is_changed_frac"] == 0.0


def loop_weight(name: str, rho: float, cap: float) -> float:
    return {"tis": min(rho, cap), "mis": rho if rho <= cap else 0.0,
            "icepop": rho if 1 / cap <= rho <= cap else 0.0}[name]


def test_injected_noise_is_what_the_mismatch_logs(tmp_path, make_config, tiny_model_cfg, tokenizer):
    metrics, _, noise, mask = one_step(make_config(tmp_path), tiny_model_cfg, tokenizer, noisy=True)
    valid = [x for x, m in zip(noise.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    # log rho = old - rollout = (trainer - clean engine, ~1e-6) - noise
    kl = sum(math.exp(-x) + x - 1 for x in valid) / len(valid)  # k3 with log r = -noise: KL(pi_rollout || pi_old)
    assert metrics["rollout_kl"] == pytest.approx(kl, abs=1e-5)
    assert metrics["rollout_logprob_diff_max"] == pytest.approx(max(abs(x) for x in valid), abs=1e-5)
    over = sum(abs(x) > 0.1 for x in valid)
    assert metrics["rollout_logprob_diff_frac"] == pytest.approx(over / len(valid), abs=1e-6)  # the count, exactly
    assert 0 < metrics["rollout_logprob_diff_frac"] < 1 and metrics["first_log_ratio_max"] < 1e-4
    print(f"injected: k3 {kl:.6f}, max {max(abs(x) for x in valid)}; logged: {metrics['rollout_kl']:.6f}, "
          f"{metrics['rollout_logprob_diff_max']:.6f}, frac {metrics['rollout_logprob_diff_frac']:.4f}")


@pytest.mark.parametrize("name,level", CORRECTIONS)
def test_the_weights_under_injected_noise_are_the_plain_loops(tmp_path, make_config, tiny_model_cfg, tokenizer,
                                                             name, level):
    cap = 1.2  # e^0.3 = 1.35 is over it, e^0.05 = 1.05 under
    cfg = make_config(tmp_path, f"rl.rollout_correction={name}", f"rl.rollout_correction_level={level}",
                      f"rl.rollout_correction_cap={cap}")
    metrics, _, noise, mask = one_step(cfg, tiny_model_cfg, tokenizer, noisy=True)
    weights, changed = [], []
    for row_noise, row_mask in zip(noise.tolist(), mask.tolist(), strict=True):
        row = [x for x, m in zip(row_noise, row_mask, strict=True) if m]
        rhos = [math.exp(-x) for x in row] if level == "token" else [math.exp(-sum(row))] * len(row)
        weights += [loop_weight(name, rho, cap) for rho in rhos]
        changed += [loop_weight(name, rho, cap) != rho for rho in rhos]
    assert metrics["rollout_is_weight_mean"] == pytest.approx(sum(weights) / len(weights), abs=1e-4)
    assert metrics["rollout_is_changed_frac"] == pytest.approx(sum(changed) / len(changed), abs=1e-6)
    uncorrected, *_ = one_step(make_config(tmp_path), tiny_model_cfg, tokenizer, noisy=True)
    assert 0 < metrics["rollout_is_changed_frac"] < 1  # both branches of the weight
    assert metrics["loss"] != uncorrected["loss"]  # it acts where the log-probs differ
    print(f"{name}/{level}: weight mean {metrics['rollout_is_weight_mean']:.6f} (loop "
          f"{sum(weights) / len(weights):.6f}), changed {metrics['rollout_is_changed_frac']:.4f}")
