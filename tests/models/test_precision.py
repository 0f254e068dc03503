"""model.dtype=bfloat16: mixed precision (bf16 matmuls, float32 master weights), the decoder's one-time cast,
and the RL step's recomputed log pi_old that keeps the first-minibatch ratio check exact."""

import sys

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.models.lean import LeanDecoder
from posttrain.models.precision import compute_dtype, cpu_has_native_bf16, precision, recompute_old_logprobs
from posttrain.train.optim import PhaseTimer
from posttrain.models.chat import encode_prompts
from posttrain.rl.loop import RLRun
from posttrain.rollout import generate
from posttrain.tasks import ArithmeticTask

PROMPTS = ["1+2=", "37+58=", "5+5=", "12+30="]


def test_dtype_names_resolve():
    assert compute_dtype(ModelConfig(dtype="float32")) == torch.float32
    assert compute_dtype(ModelConfig(dtype="bfloat16")) == torch.bfloat16
    if not torch.cuda.is_available():
        want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        assert compute_dtype(ModelConfig(dtype="auto")) == want
    assert not recompute_old_logprobs(ModelConfig()) and recompute_old_logprobs(ModelConfig(dtype="bfloat16"))


def test_decoder_casts_its_weights_once_and_samples_close_to_float32(tiny_model, tokenizer, monkeypatch):
    gen = sys.modules[generate.__module__]
    seen = []
    init = LeanDecoder.__init__
    monkeypatch.setattr(LeanDecoder, "__init__", lambda self, *a, **kw: (init(self, *a, **kw), seen.append(self))[0])
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    kw = dict(max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, greedy=True)
    full = generate(tiny_model, ids, mask, **kw)
    with precision(ModelConfig(dtype="bfloat16")):
        low = generate(tiny_model, ids, mask, **kw)
    assert seen[0].layers[0].w_qkv.dtype == torch.float32 and seen[1].layers[0].w_qkv.dtype == torch.bfloat16
    assert seen[1].head_weight.dtype == torch.bfloat16 and seen[1].cache.k.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # the model itself is not cast
    first = low.response_mask[:, 0] > 0
    diff = (low.rollout_logprobs[:, 0] - full.rollout_logprobs[:, 0]).abs()[first]
    assert diff.max() < 0.1  # bf16 rounding, not a bug
    assert gen.COMPACT_BELOW > 0


class EvenFirstChar(ArithmeticTask):
    def reward(self, prompts, completions, problems):
        return [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]


def test_a_bf16_rl_step_recomputes_old_logprobs_and_updates_float32_weights(tmp_path, make_config, tiny_model,
                                                                             tokenizer):
    cfg = make_config(tmp_path, "model.dtype=bfloat16", "rl.check_invariants=true", "rl.mini_batches=2",
                      "rl.micro_batch_size=4", "rl.ppo_epochs=2")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstChar(cfg.task, cfg.seed))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    timer = PhaseTimer()
    with precision(cfg.model):
        metrics = state.step(timer)  # the first-minibatch ratio check raises if log pi_old is off
    assert metrics["first_log_ratio_max"] == 0.0  # log pi_old by the trainer, in the update's own micro-batches
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_the_first_minibatchs_old_logprobs_come_from_its_own_update_forward(tmp_path, make_config, tiny_model,
                                                                           tokenizer, monkeypatch):
    """bf16: log pi_old of the first minibatch is its update forward's, detached (no separate pass), and equals
    what the separate pass computes with the weights before the update; the other minibatch is computed before."""
    import copy

    from posttrain.batch import map_micro_batches
    from posttrain.models.logprobs import response_logprobs
    from posttrain.rl import learner

    cfg = make_config(tmp_path, "model.dtype=bfloat16", "rl.check_invariants=true", "rl.mini_batches=2",
                      "rl.micro_batch_size=4", "rl.ppo_epochs=2")
    state = RLRun.local(cfg, tiny_model, tokenizer, EvenFirstChar(cfg.task, cfg.seed))
    start = copy.deepcopy(tiny_model)
    own, passes = [], []
    backward, recompute = learner.actor_backward, learner.trainer_old_logprobs

    def spy_backward(cfg, st, mb, *args, own_old=False, **kw):
        if own_old:
            own.append(mb.rows)
        return backward(cfg, st, mb, *args, own_old=own_old, **kw)

    monkeypatch.setattr(learner, "actor_backward", spy_backward)
    monkeypatch.setattr(learner, "trainer_old_logprobs", lambda c, st, mbs, w: (passes.append(len(mbs)),
                                                                              recompute(c, st, mbs, w)))
    with precision(cfg.model):
        metrics = state.step(PhaseTimer())
        first = own[0]
        with torch.no_grad():
            want = map_micro_batches(first, 4, lambda m: response_logprobs(
                start, m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask)[0]) * first.loss_mask
    assert len(own) == 1 and passes == [1]  # one minibatch's pi_old by its own forward, one recomputed before
    assert not torch.equal(first.old_logprobs, first.rollout_logprobs)  # written, and not into the rollout's
    torch.testing.assert_close(first.old_logprobs, want, rtol=0, atol=1e-5)
    assert metrics["first_log_ratio_max"] == 0.0


@pytest.mark.parametrize("path", ["transformers", "lean"])
def test_a_forward_after_an_optimizer_step_sees_the_new_weights(tiny_model, tokenizer, path, monkeypatch):
    """One precision() region spans a whole run: each forward must cast the float32 weights as they are now, not
    reuse the bf16 copies made before the optimizer step (autocast's weight cache would)."""
    from posttrain.models import lean
    from posttrain.models.logprobs import response_logprobs

    if path == "transformers":
        monkeypatch.setattr(lean, "enabled", lambda: False)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    response = torch.full((len(PROMPTS), 3), tokenizer.convert_tokens_to_ids("7"))
    rmask = torch.ones(response.shape)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    with precision(ModelConfig(dtype="bfloat16")):
        for name, p in tiny_model.named_parameters():  # one weight at a time: every leaf must be re-read
            if p.dim() < 2:
                continue
            before, _ = response_logprobs(tiny_model, ids, mask, response, rmask)
            opt.zero_grad()
            p.grad = torch.randn_like(p)
            opt.step()
            after, _ = response_logprobs(tiny_model, ids, mask, response, rmask)
            assert not torch.equal(before, after), f"{path}: the forward did not see the update of {name}"


def test_backend_ray_refuses_bf16():
    from posttrain.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="model.dtype=bfloat16 is not available with backend=ray"):
        build_config({}, ["model.dtype=bfloat16", "backend=ray"])


def test_training_attention_under_cpu_autocast_runs_sdpa_in_float32():
    """bf16 mixed precision on a CPU: the training forward's attention (large enough for SDPA, under autograd)
    runs SDPA in float32 on its inputs cast up (the CPU's bf16 flash backward is slower), so it equals float32
    SDPA of the same values exactly; without autograd (the prefill) it stays in bf16."""
    import torch.nn.functional as F

    from posttrain.models import lean

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 160, 16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 160, 16, generator=g).bfloat16().requires_grad_() for _ in range(2))
    bias = lean.attention_bias(torch.ones(2, 160), 160)
    assert 160 * 160 > lean.SMALL_ATTENTION
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean.attention(q, k, v, bias, 0.25)
        with torch.no_grad():
            low = lean.attention(q.detach().bfloat16(), k.detach(), v.detach(), bias, 0.25)
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=bias, scale=0.25, enable_gqa=True)
    assert out.dtype == torch.float32 and torch.equal(out, want) and low.dtype == torch.bfloat16
    out.sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == v.grad.dtype == torch.bfloat16
