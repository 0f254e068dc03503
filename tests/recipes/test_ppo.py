"""PPO-RLHF in the RL loop: critic, reference, reward model, KL-penalty rewards, GAE, ptx and the buffer."""

import math

import pytest
import torch

from posttrain.batch import cat_padded
from posttrain.buffer import Experience, ExperienceBuffer
from posttrain.config import ConfigError
from posttrain.models import save_pretrained
from posttrain.models.reward import RewardModel
from posttrain.models.value import _head, scalar_model_from_pretrained
from posttrain.train.optim import PhaseTimer
from posttrain.rl.experience import kl_penalty_rewards
from posttrain.rl.loop import make_experience
from posttrain.rl.loop import RLRun
from posttrain.rl.learner import actor_backward, critic_backward
from posttrain.train.losses import sft_loss
from tests.recipes.test_rl import EvenFirstCharTask, snapshot

PPO = ["rl.advantage=gae", "rl.group_size=1", "rl.prompts_per_step=8", "rl.kl_placement=reward",
       "rl.kl_estimator=k1", "rl.whiten_advantages=true", "rl.critic_init=policy", "rl.mini_batches=2",
       "rl.ppo_epochs=2", "rl.lam=0.95"]


@pytest.fixture
def reward_model_dir(tmp_path, tiny_model, tokenizer):
    """A saved tiny reward model with a random head and normalisation stats."""
    save_pretrained(tiny_model, tokenizer, tmp_path / "sft")
    model = scalar_model_from_pretrained(tmp_path / "sft", tokenizer.pad_token_id)
    with torch.no_grad():
        _head(model).weight.normal_(generator=torch.Generator().manual_seed(1))
    rm = RewardModel(model, tokenizer)
    rm.set_normalization(0.25, 2.0)
    return rm.save(tmp_path / "rm")


def ppo_state(tmp_path, make_config, model, tokenizer, *overrides):
    cfg = make_config(tmp_path, *PPO, *overrides)
    return cfg, RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))


def test_kl_penalty_rewards_match_a_loop():
    g = torch.Generator().manual_seed(0)
    B, T, beta = 5, 6, 0.3
    logprobs, ref = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    lengths = [6, 1, 3, 0, 4]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    scores = torch.randn(B, generator=g)
    got = kl_penalty_rewards(scores, logprobs, ref, mask, beta)
    for i in range(B):
        for t in range(T):
            expected = 0.0
            if t < lengths[i]:
                expected = -beta * (logprobs[i, t].item() - ref[i, t].item())
                if t == lengths[i] - 1:
                    expected += scores[i].item()
            assert got[i, t].item() == pytest.approx(expected, abs=1e-6)


def test_one_ppo_step_moves_actor_and_critic_and_reports_everything(tmp_path, make_config, tiny_model, tokenizer):
    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.entropy_coef=0.01")
    actor0, critic0 = snapshot(state.learner.policy), snapshot(state.learner.critic)
    metrics = state.step()
    assert [n for n, p in state.learner.policy.named_parameters() if torch.equal(p, actor0[n])] == []
    assert [n for n, p in state.learner.critic.named_parameters() if torch.equal(p, critic0[n])] == []
    for key in ("reward_mean", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss",
                "explained_variance", "response_length", "grad_norm", "critic_grad_norm", "vf_clip_frac"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert len(state.learner.buffer) == 0  # flushed after the update
    ref = dict(state.learner.reference.named_parameters())
    assert all(torch.equal(ref[n], actor0[n]) for n in actor0)  # the reference stays frozen


def test_experience_holds_gae_of_the_kl_penalised_rewards(tmp_path, make_config, tiny_model, tokenizer):
    from posttrain.algos.advantages import gae
    from posttrain.algos.utils import masked_whiten

    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.kl_coef=0.2")
    exp, _, metrics = make_experience(state, 1, PhaseTimer())
    m = exp.response_mask
    scores = torch.tensor(state.task.scored)
    rewards = kl_penalty_rewards(scores, exp.old_logprobs, exp.ref_logprobs, m, 0.2, "k1")
    adv, ret = gae(rewards, exp.values, m, cfg.rl.gamma, cfg.rl.lam)
    torch.testing.assert_close(exp.returns, ret)
    torch.testing.assert_close(exp.advantages, masked_whiten(adv, m) * m)
    assert metrics["kl"] == pytest.approx(((exp.old_logprobs - exp.ref_logprobs) * m).sum(-1).mean().item())


def test_first_minibatch_of_first_epoch_is_on_policy(tmp_path, make_config, tiny_model, tokenizer):
    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.mini_batches=4")
    exp, _, _ = make_experience(state, 1, PhaseTimer())
    state.learner.buffer.add(exp)
    first = state.learner.buffer.minibatches(4, state.learner.sampler)[0]
    stats = actor_backward(cfg, state.learner, first)
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and abs(stats["ratio_max"] - 1) < 1e-5
    assert stats["clip_frac"] == 0.0


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ptx_adds_exactly_its_own_gradient(tmp_path, make_config, tiny_model, tokenizer):
    """grad(actor loss with lambda_ptx) - grad(without) == lambda_ptx * grad(ptx loss)."""
    cfg0, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer)
    cfg1 = make_config(tmp_path, *PPO, "rl.ptx_coef=0.5")
    exp, _, _ = make_experience(state, 1, PhaseTimer())
    ptx_batch = (["1+2=", "", "7+8="], ["3", "hello", "15"])
    out = {}
    for name, cfg in (("without", cfg0), ("with", cfg1)):
        tiny_model.zero_grad(set_to_none=True)
        stats = actor_backward(cfg, state.learner, exp, ptx_batch)
        out[name] = grads(tiny_model)
    assert "ptx_loss" in stats
    tiny_model.zero_grad(set_to_none=True)
    loss, _ = sft_loss(tiny_model, tokenizer, *ptx_batch)
    loss.backward()
    ptx_grad = grads(tiny_model)
    assert stats["ptx_loss"] == pytest.approx(loss.item())
    for n in ptx_grad:
        torch.testing.assert_close(out["with"][n] - out["without"][n], 0.5 * ptx_grad[n], atol=1e-6, rtol=1e-4)
    assert any(ptx_grad[n].abs().sum() > 0 for n in ptx_grad)


def test_ptx_from_a_text_file_appears_in_the_metrics(tmp_path, make_config, tiny_model, tokenizer):
    (tmp_path / "ptx.txt").write_text("1+1=2\n\n2+2=4\n3+3=6\n")
    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.ptx_coef=0.1",
                           f"rl.ptx_data={tmp_path / 'ptx.txt'}", "rl.ptx_batch_size=2")
    assert state.learner.ptx.data == [("", "1+1=2"), ("", "2+2=4"), ("", "3+3=6")]
    metrics = state.step()
    assert metrics["ptx_loss"] > 0


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_micro_batches_accumulate_the_same_gradient(tmp_path, make_config, tiny_model, tokenizer, which):
    cfg_full, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.entropy_coef=0.01")
    cfg_micro = make_config(tmp_path, *PPO, "rl.entropy_coef=0.01", "rl.micro_batch_size=2")
    exp, _, _ = make_experience(state, 1, PhaseTimer())
    model = state.learner.policy if which == "actor" else state.learner.critic
    out = []
    for cfg in (cfg_full, cfg_micro):
        model.zero_grad(set_to_none=True)
        (actor_backward if which == "actor" else critic_backward)(cfg, state.learner, exp)
        out.append(grads(model))
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], atol=1e-6, rtol=1e-4)


def test_reward_model_scores_and_critic_starts_from_it(tmp_path, make_config, tiny_model, tokenizer, reward_model_dir):
    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.reward=reward_model",
                           f"rl.reward_model_path={reward_model_dir}", "rl.critic_init=reward_model",
                           "rl.missing_eos_penalty=1.0")
    rm_params = dict(state.roles.reward_workers.workers[0].reward_model.model.named_parameters())
    assert all(torch.equal(p, rm_params[n]) for n, p in state.learner.critic.named_parameters())
    exp, _, metrics = make_experience(state, 1, PhaseTimer())
    assert "gold_score" in metrics and "rm_score_mean" in metrics
    assert metrics["gold_score"] == pytest.approx(sum(state.task.scored) / len(state.task.scored))
    # the score is the normalised RM output minus the penalty for responses without EOS
    prompts = state.task.prompts
    from posttrain.models.chat import decode_responses

    completions = decode_responses(tokenizer, exp.response_ids, exp.response_mask)
    finished = (exp.response_ids == tokenizer.eos_token_id).any(-1)
    expected = state.roles.reward_workers.workers[0].reward_model.score(prompts, completions, finished.tolist()) - (~finished).float()
    assert metrics["reward_mean"] == pytest.approx(expected.mean().item(), abs=1e-5)
    before = snapshot(state.roles.reward_workers.workers[0].reward_model.model)
    state.step()
    assert all(torch.equal(p, before[n]) for n, p in state.roles.reward_workers.workers[0].reward_model.model.named_parameters())


def test_adaptive_kl_controller_moves_the_coefficient(tmp_path, make_config, tiny_model, tokenizer):
    cfg, state = ppo_state(tmp_path, make_config, tiny_model, tokenizer, "rl.kl_target=0.001", "rl.kl_horizon=10",
                           "rl.lr=0.01")
    first = state.step()
    second = state.step()
    assert first["kl_coef"] == cfg.rl.kl_coef
    assert second["kl_coef"] != first["kl_coef"]


def test_gradients_left_on_the_policy_do_not_leak_into_the_update(tmp_path, make_config, tiny_model_cfg, tokenizer):
    from posttrain.models import build_tiny_model

    results = []
    for dirty in (False, True):
        model = build_tiny_model(tiny_model_cfg, tokenizer, seed=0)
        if dirty:  # e.g. the last SFT backward pass
            for p in model.parameters():
                p.grad = torch.full_like(p, 7.0)
        cfg, state = ppo_state(tmp_path, make_config, model, tokenizer)
        state.step()
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_buffer_minibatches_cover_every_row_once_per_epoch():
    def exp(n, P, T, offset):
        ids = torch.arange(offset, offset + n)[:, None]
        return Experience(prompt_ids=ids.expand(n, P).clone(), prompt_mask=torch.ones(n, P, dtype=torch.long),
                          response_ids=ids.expand(n, T).clone(), response_mask=torch.ones(n, T), loss_mask=torch.ones(n, T),
                          old_logprobs=torch.zeros(n, T), advantages=torch.zeros(n, T), returns=torch.zeros(n, T))

    buf = ExperienceBuffer(pad_token_id=0)
    buf.add(exp(4, 3, 2, 10))
    buf.add(exp(4, 5, 4, 20))
    g = torch.Generator().manual_seed(0)
    mbs = buf.minibatches(4, g)
    assert [len(mb) for mb in mbs] == [2, 2, 2, 2]
    rows = sorted(int(mb.prompt_ids[i, -1]) for mb in mbs for i in range(len(mb)))
    assert rows == [10, 11, 12, 13, 20, 21, 22, 23]
    both = cat_padded(buf._items, 0)
    assert both.prompt_ids.shape == (8, 5) and both.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert both.response_mask[0].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="equal minibatches"):
        buf.minibatches(3, g)
    buf.clear()
    assert len(buf) == 0


@pytest.mark.parametrize("overrides,match", [
    (["rl.reward=reward_model"], "reward_model_path"),
    (["rl.advantage=gae", "rl.critic_init=reward_model"], "critic_init"),
    (["rl.dynamic_sampling=true", "rl.group_size=1", "rl.prompts_per_step=8"], "group_size"),
    (["rl.overlong_buffer_frac=0.05"], "overlong_buffer_frac"),
    (["rl.preset=grpo_x"], "did you mean"),
    (["rl.micro_batch_size=3"], "micro_batch_size"),
    (["rl.kl_placement=everywhere"], "kl_placement"),
])
def test_bad_ppo_config_is_rejected_at_load(tmp_path, make_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tmp_path, *overrides)
