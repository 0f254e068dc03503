"""Presets, DAPO's extras, ReMax's greedy baseline and the training invariants, in the real RL loop."""

import math
import re
from pathlib import Path

import pytest
import torch

from posttrain.algos import AGG_MODES
from posttrain.algos.shaping import overlong_penalty
from posttrain.batch import RolloutBatch
from posttrain.config import ConfigError, build_config
from posttrain.errors import InvariantError
from posttrain.presets import PRESETS
from posttrain.train.optim import PhaseTimer
from posttrain.rl import experience, learner, loop
from posttrain.rl.learner import actor_backward, combine_update
from posttrain.rl.loop import RLRun, make_experience, train_rl
from posttrain.rl.workers import RewardWorker
from tests.conftest import tiny_run_dict
from tests.recipes.test_rl import EvenFirstCharTask, snapshot

ALGORITHM_KEYS = ("advantage", "policy_loss", "loss_agg", "kl_coef")


def preset_config(tmp_path, preset, *overrides):
    """A tiny run with the algorithm keys left to the preset."""
    data = tiny_run_dict(tmp_path)
    for key in ALGORITHM_KEYS:
        data["rl"].pop(key)
    data["rl"]["preset"] = preset
    return build_config(data, list(overrides))


def favour_eos(model, tokenizer, bias: float = 2.5):
    """Add `bias` to the EOS logit (in generation and training alike), so responses have ragged lengths."""
    eos_bias = torch.zeros(len(tokenizer))
    eos_bias[tokenizer.eos_token_id] = bias
    model.lm_head.register_forward_hook(lambda module, args, out: out + eos_bias)


class ConstantTask(EvenFirstCharTask):
    """Every completion scores `value`: every group's rewards are equal."""

    value = 1.0

    def reward(self, prompts, completions, problems):
        self.prompts = list(prompts)
        return [self.value] * len(completions)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_expands_to_its_settings_and_user_keys_win(tmp_path, preset):
    cfg = preset_config(tmp_path, preset)
    given = set(tiny_run_dict(tmp_path)["rl"]) - set(ALGORITHM_KEYS)  # the test config's own choices win
    for key, value in PRESETS[preset].items():
        if key in given:
            assert getattr(cfg.rl, key) == tiny_run_dict(tmp_path)["rl"][key], key
            continue
        assert getattr(cfg.rl, key) == value, key
    assert preset_config(tmp_path, preset, "rl.clip_eps_high=0.5").rl.clip_eps_high == 0.5
    assert "preset" in cfg.model_dump()["rl"]


def test_unknown_preset_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'dapo'"):
        preset_config(tmp_path, "dpao")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains(tmp_path, preset, tiny_model, tokenizer):
    cfg = preset_config(tmp_path, preset, "rl.ppo_epochs=1")
    before = snapshot(tiny_model)
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    metrics = state.step()
    assert math.isfinite(metrics["loss"]) and metrics["first_log_ratio_max"] < 1e-4
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_the_loop_never_branches_on_an_algorithm_name():
    source = "".join(Path(m.__file__).read_text() for m in (loop, experience, learner))
    named = re.findall(r"\b(?:advantage|policy_loss|preset|loss_agg)\s*(?:==|!=|in\s*\()", source)
    assert named == []
    for name in [*PRESETS, "gae", "grpo", "rloo", "remax", "gspo"]:
        assert f'"{name}"' not in source, name


def test_dynamic_sampling_keeps_only_groups_with_unequal_scores(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.dynamic_sampling=true", "rl.prompts_per_step=4", "rl.group_size=4")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    data, allgen, metrics = state.sample(1, PhaseTimer())
    assert len(data.batch) == 16 and metrics["ds_filled_groups"] == 0
    grouped = data.scores.view(4, 4)
    assert (grouped.max(-1).values > grouped.min(-1).values).all()
    assert len(allgen.batch) == 16 * metrics["ds_rounds"]
    # the kept rows are rows of what was generated, in order
    for i in range(len(data.batch)):
        j = [k for k in range(len(allgen.batch)) if torch.equal(allgen.batch.response_ids[k], data.batch.response_ids[i])
             and allgen.problems[k] == data.problems[i]]
        assert j, "a kept row must come from a generated one"


def test_dynamic_sampling_fills_up_with_dropped_groups_after_the_cap(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=3")
    state = RLRun.local(cfg, tiny_model, tokenizer, ConstantTask(cfg.task, cfg.seed))
    exp, _, metrics = make_experience(state, 1, PhaseTimer())
    assert metrics["ds_rounds"] == 3 and metrics["ds_kept_frac"] == 0.0
    assert metrics["ds_filled_groups"] == cfg.rl.prompts_per_step
    assert len(exp) == cfg.rl.prompts_per_step * cfg.rl.group_size
    assert (exp.advantages == 0).all()  # equal scores in every group: no policy gradient


def test_overlong_penalty_is_added_to_the_score(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.max_new_tokens=4", "rl.overlong_buffer_frac=0.5", "rl.overlong_penalty_factor=2")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    lengths = torch.tensor([1, 2, 3, 4])
    mask = (torch.arange(4)[None] < lengths[:, None]).float()
    ids = torch.where(mask > 0, torch.full((4, 4), tokenizer.convert_tokens_to_ids("2")), tokenizer.pad_token_id)
    batch = RolloutBatch(torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long), ids, mask,
                         torch.zeros(4, 4), torch.tensor([True, True, True, False]))
    problems = state.task.train_problems[:4]
    out = RewardWorker(cfg, tokenizer, state.task).score(problems, batch)
    # budget 4, buffer 2: lengths 1, 2 free; 3 -> -2 * 1/2; 4 -> -2
    torch.testing.assert_close(out.penalty, torch.tensor([0.0, 0.0, -1.0, -2.0]))
    torch.testing.assert_close(out.overlong, out.penalty)
    torch.testing.assert_close(overlong_penalty(lengths, 4, 2, 2.0), torch.tensor([0.0, 0.0, -1.0, -2.0]))


def test_mask_truncated_with_every_response_cut_stops_on_the_empty_mask(tmp_path, make_config, tiny_model, tokenizer):
    favour_eos(tiny_model, tokenizer, bias=-1e4)  # no response can end: every one is cut at 2 tokens
    cfg = make_config(tmp_path, "rl.max_new_tokens=2", "rl.mask_truncated=true")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    with pytest.raises(InvariantError, match="response mask is empty"):
        make_experience(state, 1, PhaseTimer())


def test_mask_truncated_drops_cut_off_responses_from_the_loss(tmp_path, make_config, tiny_model, tokenizer):
    favour_eos(tiny_model, tokenizer)  # about half the responses end within 2 tokens
    cfg = make_config(tmp_path, "rl.max_new_tokens=2", "rl.mask_truncated=true")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    exp, record, metrics = make_experience(state, 1, PhaseTimer())
    finished = (exp.response_ids == tokenizer.eos_token_id).any(-1)
    assert 0 < metrics["truncated_frac"] < 1, "the test needs both kinds"
    assert (exp.loss_mask[~finished] == 0).all() and (exp.loss_mask[finished].sum(-1) > 0).all()
    assert (exp.response_mask.sum(-1) > 0).all()  # the forward pass still reads every response
    assert (exp.advantages[~finished] == 0).all() and (exp.old_logprobs[~finished] == 0).all()
    assert record.num_tokens == int(exp.loss_mask.sum()) == int(exp.num_tokens)


def test_remax_baseline_is_the_greedy_responses_score(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.advantage=remax", "rl.group_size=2")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    exp, _, metrics = make_experience(state, 1, PhaseTimer())
    sampled = torch.tensor(state.task.scored[:len(exp)])  # the sampled responses were scored first
    greedy = torch.tensor(state.task.scored[len(exp):])  # then one greedy response per prompt
    assert len(greedy) == cfg.rl.prompts_per_step
    first_token_adv = exp.advantages[:, 0]
    torch.testing.assert_close(first_token_adv, sampled - greedy.repeat_interleave(2))
    assert metrics["baseline_reward_mean"] == pytest.approx(greedy.mean().item())


def test_ratio_invariant_catches_a_logprob_mismatch(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path)
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    exp, _, _ = make_experience(state, 1, PhaseTimer())
    assert actor_backward(cfg, state.learner, exp, check_ratio=True)["first_log_ratio_max"] < 1e-5
    exp.old_logprobs = exp.old_logprobs + 0.01 * exp.loss_mask  # as if generated at another temperature
    learner = state.roles.learners.workers[0]
    with pytest.raises(InvariantError, match="ratio should be 1.*rl.ratio_tolerance"):
        learner.update(exp, 0.0)
    learner.cfg = make_config(tmp_path, "rl.check_invariants=false")
    learner.state.buffer.clear()
    assert math.isfinite(combine_update([learner.update(exp, 0.0)])["loss"])


def test_dropout_in_the_model_config_does_not_break_the_ratio(tmp_path, make_config, tiny_model, tokenizer):
    tiny_model.config.attention_dropout = 0.5  # the loop runs the policy in eval mode
    cfg = make_config(tmp_path)
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    state.learner.policy.eval()
    assert state.step()["first_log_ratio_max"] < 1e-5


class NaNTask(EvenFirstCharTask):
    def reward(self, prompts, completions, problems):
        return [float("nan")] + [1.0] * (len(completions) - 1)


def test_non_finite_advantages_stop_the_run_with_the_step(tmp_path, make_config, tiny_model, tokenizer):
    from posttrain.train.metrics import MetricsLogger

    cfg = make_config(tmp_path)
    state = RLRun.local(cfg, tiny_model, tokenizer, NaNTask(cfg.task, cfg.seed))
    with MetricsLogger(tmp_path / "m.jsonl") as logger, pytest.raises(InvariantError, match="RL step 1: .*non-finite advantages"):
        train_rl(cfg, state.roles, state.task, logger)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_give_the_same_gradient_for_every_aggregation(tmp_path, make_config, tiny_model, tokenizer, mode):
    """A batch of 8 in one micro-batch against 4 micro-batches of 2 (ragged responses, KL and entropy on)."""
    base = ["rl.prompts_per_step=2", "rl.group_size=4", f"rl.loss_agg={mode}", "rl.entropy_coef=0.01"]
    cfg_full, cfg_micro = make_config(tmp_path, *base), make_config(tmp_path, *base, "rl.micro_batch_size=2")
    favour_eos(tiny_model, tokenizer, 3.0)
    state = RLRun.local(cfg_full, tiny_model, tokenizer, EvenFirstCharTask(cfg_full.task, cfg_full.seed))
    exp, _, _ = make_experience(state, 1, PhaseTimer())
    assert len(exp) == 8 and len(set(exp.response_mask.sum(-1).tolist())) > 1
    out = []
    for cfg in (cfg_full, cfg_micro):
        tiny_model.zero_grad(set_to_none=True)
        actor_backward(cfg, state.learner, exp)
        out.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], atol=1e-6, rtol=0)
