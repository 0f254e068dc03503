"""GRPO step: every parameter moves, the reference stays frozen, the metrics are there, and the
outcome reward sits on the last response token."""

import math

import pytest
import torch

from posttrain.algos import ADVANTAGES, AGG_MODES, POLICY_LOSSES
from posttrain.models.logprobs import causal_lm_logits
from posttrain.models.chat import encode_prompts
from posttrain.rl.experience import outcome_token_rewards
from posttrain.rl.loop import RLRun
from posttrain.tasks import ArithmeticTask


class EvenFirstCharTask(ArithmeticTask):
    """Arithmetic prompts; reward 1.0 when the completion's first character has an even code point.

    An untrained model answers with random characters, so this reward varies within groups (exact
    match would be all zeros and give GRPO nothing to learn from). Records what it saw and scored.
    """

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.scored: list[float] = []
        self.prompts: list[str] = []

    def reward(self, prompts, completions, problems):
        rewards = [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]
        self.scored += rewards
        self.prompts = list(prompts)
        return rewards


def start(cfg, model, tokenizer):
    task = EvenFirstCharTask(cfg.task, cfg.seed)
    return RLRun.local(cfg, model, tokenizer, task), task


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_one_grpo_step_changes_every_parameter(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path)
    before = snapshot(tiny_model)
    state, task = start(cfg, tiny_model, tokenizer)
    metrics = state.step()
    rewards = torch.tensor(task.scored).view(cfg.rl.prompts_per_step, cfg.rl.group_size)
    assert (rewards.std(-1) > 0).any(), "the test needs a group whose rewards differ"
    unchanged = [name for name, p in tiny_model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert metrics["reward_mean"] == pytest.approx(rewards.mean().item())


def test_advantages_get_contiguous_groups_and_the_outcome_rewards(tmp_path, make_config, tiny_model, tokenizer,
                                                                   monkeypatch):
    cfg = make_config(tmp_path, "rl.group_size=3", "rl.prompts_per_step=5")
    calls = []
    real_get = ADVANTAGES.get

    def spy_get(name):
        fn = real_get(name)

        def spy(token_rewards, response_mask, **kw):
            calls.append((token_rewards, response_mask, kw))
            return fn(token_rewards, response_mask, **kw)

        return spy

    monkeypatch.setattr(ADVANTAGES, "get", spy_get)
    state, task = start(cfg, tiny_model, tokenizer)  # the estimator is looked up once, at setup
    state.step()
    (token_rewards, mask, kw), = calls
    assert kw["group_ids"].tolist() == [i for i in range(5) for _ in range(3)]
    groups = [task.prompts[i:i + 3] for i in range(0, 15, 3)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 5
    assert token_rewards.sum(-1).tolist() == task.scored
    assert torch.equal(token_rewards, outcome_token_rewards(torch.tensor(task.scored), mask))


def test_metrics_of_a_first_on_policy_step(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path)
    state, _ = start(cfg, tiny_model, tokenizer)
    metrics = state.step()
    for key in ("reward_mean", "kl", "entropy", "clip_frac", "grad_norm"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["entropy"] > 0 and metrics["grad_norm"] > 0
    # one epoch, one mini-batch: the policy being updated is the one that sampled, and equals the reference
    assert metrics["clip_frac"] == 0.0
    assert abs(metrics["ratio_max"] - 1.0) < 1e-5
    assert abs(metrics["kl"]) < 1e-6
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    assert 1 <= metrics["response_length"] <= cfg.rl.max_new_tokens
    assert 0 < state.last.num_tokens <= n * cfg.rl.max_new_tokens


def test_reference_is_a_frozen_copy_and_kl_grows(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.kl_coef=0.1")
    initial = snapshot(tiny_model)
    state, _ = start(cfg, tiny_model, tokenizer)
    assert state.learner.reference is not None and state.learner.reference is not state.learner.policy
    assert not any(p.requires_grad for p in state.learner.reference.parameters())
    state.step()
    second = state.step()
    ref = dict(state.learner.reference.named_parameters())
    assert all(torch.equal(ref[name], initial[name]) for name in initial)
    assert math.isfinite(second["kl"])  # a sampled k1 estimate: its sign is noise at this size
    # the policy has moved away from the reference: the exact KL(pi || pi_ref) of the next-token distributions
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in state.task.eval_problems[:8]])
    with torch.no_grad():
        logp = causal_lm_logits(state.learner.policy, ids, mask, keep=1)[:, -1].log_softmax(-1)
        logq = causal_lm_logits(state.learner.reference, ids, mask, keep=1)[:, -1].log_softmax(-1)
    assert (logp.exp() * (logp - logq)).sum(-1).mean() > 1e-6


class ConstantRewardTask(EvenFirstCharTask):
    def reward(self, prompts, completions, problems):
        return [0.0] * len(completions)


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_with_equal_rewards_only_the_kl_term_moves_the_policy(tmp_path, make_config, tiny_model, tokenizer, kl_coef):
    cfg = make_config(tmp_path, f"rl.kl_coef={kl_coef}")
    state = RLRun.local(cfg, tiny_model, tokenizer, ConstantRewardTask(cfg.task, cfg.seed))
    with torch.no_grad():  # move the policy away from the reference taken at setup
        g = torch.Generator().manual_seed(0)
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = snapshot(tiny_model)
    metrics = state.step()
    moved = any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    if kl_coef == 0:
        assert not moved and "kl" not in metrics  # no reference model, so no KL to report
    else:
        assert moved and metrics["kl"] > 0 and metrics["loss"] > 0


def test_kl_coef_zero_loads_no_reference(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "rl.kl_coef=0")
    state, _ = start(cfg, tiny_model, tokenizer)
    assert state.learner.reference is None
    state.step()
    metrics = state.step()
    assert "kl" not in metrics


def test_outcome_reward_sits_on_the_last_response_token():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rewards = torch.tensor([0.5, -1.0, 2.0])
    expected = torch.tensor([[0.0, 0, 0.5, 0], [-1, 0, 0, 0], [0, 0, 0, 2]])
    assert torch.equal(outcome_token_rewards(rewards, mask), expected)


def test_same_seed_same_step(tmp_path, make_config, tiny_model_cfg, tokenizer):
    from posttrain.models import build_tiny_model

    cfg = make_config(tmp_path)
    results = []
    for _ in range(2):
        model = build_tiny_model(tiny_model_cfg, tokenizer, seed=0)
        state, task = start(cfg, model, tokenizer)
        state.step()
        results.append((task.scored, snapshot(model)))
    (r1, w1), (r2, w2) = results
    assert r1 == r2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("advantage", ADVANTAGES.names())
def test_every_registered_estimator_runs_in_the_loop(tmp_path, make_config, tiny_model, tokenizer, advantage):
    cfg = make_config(tmp_path, f"rl.advantage={advantage}")
    before = snapshot(tiny_model)
    state, _ = start(cfg, tiny_model, tokenizer)
    assert (state.learner.critic is not None) == ("values" in ADVANTAGES.requires(advantage))
    metrics = state.step()
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


@pytest.mark.parametrize("overrides", [
    *[[f"rl.policy_loss={name}"] for name in POLICY_LOSSES.names()],
    *[[f"rl.loss_agg={mode}"] for mode in AGG_MODES],
    ["rl.mini_batches=2", "rl.ppo_epochs=2"],
], ids=lambda o: ",".join(o))
def test_loss_options_run_and_update(tmp_path, make_config, tiny_model, tokenizer, overrides):
    cfg = make_config(tmp_path, *overrides)
    before = snapshot(tiny_model)
    state, _ = start(cfg, tiny_model, tokenizer)
    metrics = state.step()
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())

