"""Prepacked decode weights (posttrain.models.packed): the same products as F.linear, for every row count, and
generation with them equal to generation without them (POSTTRAIN_PACK=0), also while rows leave the batch."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.models import build_tiny_model
from posttrain.models.chat import encode_prompts
from posttrain.models.lean import LeanDecoder
from posttrain.models.logprobs import chunked_logprobs
from posttrain.models import packed as packed_module
from posttrain.models.packed import (PackedLinear, _has_mkl, _has_onednn, cpu_vendor, fp32_backend, linear,
                                     packing_available)
from posttrain.rollout import generate

DTYPES = [d for d in (torch.float32, torch.bfloat16) if packing_available(d, torch.device("cpu"))]
pytestmark = pytest.mark.skipif(torch.float32 not in DTYPES, reason="this torch build cannot prepack weights")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_for_every_row_count(dtype, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 24, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    packed = PackedLinear(w, b, rows=8)
    for rows in (8, 5, 1, 13):  # exactly packed, zero-padded up to 8, one row, more rows than packed (fallback)
        x = torch.randn(rows, 1, 24, generator=g).to(dtype)
        ref = F.linear(x, w, b)
        out = linear(x, packed, None)
        assert out.shape == ref.shape == (rows, 1, 48) and out.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert packed.repack(3).rows == (3 if packed.backend == "mkl" else 8)  # onednn's weight serves every count
    assert linear(x, w, b).shape == (13, 1, 48)  # a plain tensor: F.linear


@pytest.mark.skipif(not _has_mkl(), reason="this torch build has no MKL")
def test_fp32_mkl_packed_matmul_is_bit_identical_to_f_linear(monkeypatch):
    """Where MKL's packed sgemm runs (rows == packed rows) it computes the very same sums as sgemm."""
    monkeypatch.setenv("POSTTRAIN_PACK", "mkl")
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 64, generator=g), torch.randn(16, 64, generator=g)
    packed = PackedLinear(w, None, 16)
    assert packed.backend == "mkl" and torch.equal(packed(x), F.linear(x, w))


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dtype", DTYPES)
def test_onednn_packed_matmul_serves_every_row_count_with_the_same_sums(monkeypatch, dtype):
    """oneDNN's reordered weight: F.linear's products to float rounding, and for a row its result does not
    depend on how many other rows are in the call (rows leave the batch without a repack, and a run's numbers
    do not depend on its batch composition); the same call twice gives the same bits."""
    monkeypatch.setenv("POSTTRAIN_PACK", "onednn")
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(512, 256, generator=g).to(dtype), torch.randn(512, generator=g).to(dtype)
    x = torch.randn(64, 256, generator=g).to(dtype)
    packed = PackedLinear(w, b, 16)
    assert packed.backend == "onednn" and packed.repack(4) is packed
    full = packed(x)
    for n in (1, 5, 16, 40):
        assert torch.equal(packed(x[:n]), full[:n])
    assert torch.equal(packed(x), full)
    tol = 1e-4 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(full, F.linear(x, w, b), atol=tol, rtol=tol)
    small = PackedLinear(w[:100, :128].contiguous(), None, 16)  # below ONEDNN_MIN_WEIGHT: F.linear (float32)
    assert small.backend == ("plain" if dtype == torch.float32 else "onednn")
    torch.testing.assert_close(small(x[:, :128]), F.linear(x[:, :128], w[:100, :128]), atol=tol, rtol=tol)


def test_fp32_backend_follows_the_switch_and_the_cpu(monkeypatch):
    for forced in ("mkl", "onednn"):
        monkeypatch.setenv("POSTTRAIN_PACK", forced)
        assert fp32_backend() in (forced, None)
    monkeypatch.setenv("POSTTRAIN_PACK", "0")
    assert fp32_backend() is None
    monkeypatch.setenv("POSTTRAIN_PACK", "fast")
    with pytest.raises(ValueError, match="POSTTRAIN_PACK='fast'"):
        fp32_backend()
    monkeypatch.delenv("POSTTRAIN_PACK")
    expected = "mkl" if cpu_vendor() == "GenuineIntel" else "onednn"
    assert fp32_backend() in (expected, "mkl" if expected == "onednn" and not _has_onednn(torch.float32) else None)


@pytest.fixture
def model(tokenizer):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).eval()


@pytest.mark.parametrize("backend", [b for b, ok in (("mkl", _has_mkl()), ("onednn", _has_onednn(torch.float32)))
                                     if ok])
def test_generation_with_packed_weights_equals_generation_without(model, tokenizer, monkeypatch, backend):
    """Same tokens, masks and log-probs with and without packing (either float32 library), with rows finishing
    at different steps (the batch shrinks and mkl's weights are repacked for fewer rows)."""
    monkeypatch.setattr(packed_module, "ONEDNN_MIN_WEIGHT", 1)  # this model's weights are all small: pack them
    packs = []
    pack = LeanDecoder._pack
    monkeypatch.setattr(LeanDecoder, "_pack", lambda self, rows: packs.append(rows) or pack(self, rows))
    prompts = ["1+2=", "37+58=", "x", "hello world", "9", "12+3=", "a", "bb"]
    ids, mask = encode_prompts(tokenizer, prompts)
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789"))]  # rows end early
    runs = []
    for flag in (backend, "0"):
        monkeypatch.setenv("POSTTRAIN_PACK", flag)
        runs.append(generate(model, ids, mask, max_new_tokens=24, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3)))
    packed, plain = runs
    lengths = plain.response_mask.sum(1)
    assert lengths.min() < lengths.max() - 2  # rows end at different steps
    assert packs[0] == len(prompts) and len(packs) > 1 and packs[-1] <= len(prompts) // 2  # repacked for fewer rows
    assert torch.equal(packed.response_ids, plain.response_ids)
    assert torch.equal(packed.response_mask, plain.response_mask)
    torch.testing.assert_close(packed.rollout_logprobs, plain.rollout_logprobs, atol=1e-6, rtol=0)


def test_packing_is_off_with_the_switch_and_off_the_cpu(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_PACK", "0")
    assert not packing_available(torch.float32, torch.device("cpu"))
    monkeypatch.delenv("POSTTRAIN_PACK")
    assert not packing_available(torch.float32, torch.device("cuda"))
    assert not packing_available(torch.float16, torch.device("cpu"))


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_training_linear_on_onednn_has_f_linears_values_and_gradients(monkeypatch, bias):
    """The training forward's large products (packed._OnednnLinear): F.linear's output to float rounding, and
    the very gradients F.linear's backward computes from the same output gradient (the backward is the same
    matmuls)."""
    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g, requires_grad=True)
    b = torch.randn(64, generator=g, requires_grad=True) if bias else None
    x = torch.randn(3, 7, 32, generator=g, requires_grad=True)
    dy = torch.randn(3, 7, 64, generator=g)
    out = linear(x, w, b)
    assert out.grad_fn is not None and "Onednn" in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), dy)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), dy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1 << 40)  # small products keep F.linear
    assert "Onednn" not in type(linear(x, w, b).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 F.linear is left to autocast
        monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
        assert linear(x, w, b).dtype == torch.bfloat16


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
def test_chunked_logprobs_on_onednn_follow_the_head_through_fused_adamw_steps(monkeypatch):
    """The head's reordered copy is a snapshot per chunked_logprobs call, shared by its chunks and their backward
    recompute, never kept past it: fused AdamW changes the weights without bumping `_version`, so a cache keyed on
    it served a stale head after the first step (the first-minibatch ratio check caught it on SmolLM2, |log
    ratio| 1.5e-3 at step 3). Log-probs and gradients equal the F.linear computation at every step."""
    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Parameter(torch.randn(300, 16, generator=g))
    hidden = torch.randn(2, 9, 16, generator=g)
    actions = torch.randint(0, 300, (2, 9), generator=g)
    mask = torch.ones(2, 9)
    opt = torch.optim.AdamW([head], lr=0.5, fused=True)
    for _ in range(3):
        lp, _ = chunked_logprobs(hidden, head, None, actions, mask, chunk_elements=300 * 4)  # 5 chunks of 4 tokens
        (grad,) = torch.autograd.grad(lp.sum(), head)
        monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", False)  # (a process constant: fixed per forward+backward)
        ref, _ = chunked_logprobs(hidden, head, None, actions, mask, chunk_elements=300 * 4)
        (ref_grad,) = torch.autograd.grad(ref.sum(), head)
        monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
        head.grad = grad
        opt.step()


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
def test_weights_fixed_reorders_each_weight_once_per_block_and_sees_a_changed_weight(monkeypatch):
    """Inside `weights_fixed()` a weight is reordered once and its copy reused (nested blocks share it); the copy
    is made again after an in-place change that bumps `_version`, and dropped when the outermost block ends."""
    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
    made = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(packed_module, "_reorder_now", lambda w, transposed=False: made.append(w) or reorder(w, 2048))
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(64, 32, generator=g))
    x = torch.randn(5, 32, generator=g)
    with packed_module.weights_fixed():
        first = linear(x, w)
        with packed_module.weights_fixed():
            second = linear(x, w)
        third = linear(x, w)  # the inner block's end keeps the outer copy
        assert len(made) == 1 and torch.equal(first, second) and torch.equal(first, third)
        with torch.no_grad():
            w.mul_(2.0)  # bumps _version: reordered again
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert len(made) == 2
    assert packed_module._FIXED.cache is None
    linear(x, w), linear(x, w)  # outside a block: every call reorders
    assert len(made) == 4


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
def test_rl_steps_with_the_reorder_cache_equal_steps_reordering_every_call(tmp_path, make_config, tiny_model,
                                                                           tokenizer, monkeypatch):
    """Two GRPO steps (two minibatches of two micro-batches each, so a step inside the update) on oneDNN: the same
    weights, bit for bit, whether the reference pass and the gradient accumulation reuse one reorder per weight
    (`weights_fixed`) or reorder at every call. A copy kept past an optimizer step would change the second
    minibatch's gradient and the second step's reference pass."""
    import copy

    from posttrain.rl.loop import RLRun
    from posttrain.train.optim import PhaseTimer
    from tests.models.test_precision import EvenFirstChar  # a reward the untrained model's samples differ in

    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
    cfg = make_config(tmp_path, "rl.mini_batches=2", "rl.micro_batch_size=4", "rl.kl_coef=0.05",
                      "rl.warmup_steps=0", "rl.lr=1e-2")
    made = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(packed_module, "_reorder_now",
                        lambda w, transposed=False: made.append(1) or reorder(w.t().contiguous() if transposed else w, 2048))

    def run(model):
        torch.manual_seed(0)
        state = RLRun.local(cfg, model, tokenizer, EvenFirstChar(cfg.task, cfg.seed))
        for _ in range(2):
            assert state.step(PhaseTimer())["grad_norm"] > 0
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    cached = run(copy.deepcopy(tiny_model))
    with_cache = len(made)
    monkeypatch.setattr(packed_module, "_reorder",  # every call
                        lambda w, transposed=False: packed_module._reorder_now(w.detach(), transposed))
    made.clear()
    plain = run(copy.deepcopy(tiny_model))
    assert len(made) > with_cache  # the cache saved reorders
    for name, p in cached.items():
        assert torch.equal(p, plain[name]), name


@pytest.mark.skipif(not _has_onednn(torch.float32), reason="this torch build has no oneDNN")
def test_backward_dx_on_onednn_inside_a_fixed_block_equals_f_linears(monkeypatch):
    """Inside `weights_fixed()` (the RL update's micro-batches) dx = dy W runs on oneDNN against W^T, reordered once
    for the block's backward passes: F.linear's dx to float rounding and its dW exactly (still MKL's). Outside a
    block dx is F.linear's own product, bit for bit. The chunked head's dh takes the same path."""
    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", True)
    monkeypatch.setattr(packed_module, "TRAIN_ONEDNN_MACS", 1)
    made = []
    reorder_now = packed_module._reorder_now
    monkeypatch.setattr(packed_module, "_reorder_now",
                        lambda w, transposed=False: made.append(transposed) or reorder_now(w, transposed))
    g = torch.Generator().manual_seed(6)
    w = torch.nn.Parameter(torch.randn(96, 40, generator=g))
    xs = [torch.randn(n, 40, generator=g, requires_grad=True) for n in (5, 33, 70)]
    dys = [torch.randn(len(x), 96, generator=g) for x in xs]
    with packed_module.weights_fixed():
        got = [torch.autograd.grad(linear(x, w), [x, w], dy) for x, dy in zip(xs, dys)]
    assert made.count(True) == 1 and made.count(False) == 1  # one reorder of W and one of W^T for 3 passes
    for (dx, dw), x, dy in zip(got, xs, dys):
        ref_dx, ref_dw = torch.autograd.grad(F.linear(x, w), [x, w], dy)
        torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5)
        assert torch.equal(dw, ref_dw)
    dx, _ = torch.autograd.grad(linear(xs[0], w), [xs[0], w], dys[0])  # outside a block
    assert torch.equal(dx, dys[0].mm(w))
    hidden = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    actions, mask = torch.randint(0, 96, (2, 9), generator=g), torch.ones(2, 9)
    with packed_module.weights_fixed():
        lp, ent = chunked_logprobs(hidden, w, None, actions, mask, with_entropy=True, chunk_elements=96 * 4)
        dh = torch.autograd.grad((lp + 0.3 * ent).sum(), hidden)[0]
    monkeypatch.setattr(packed_module, "_TRAIN_ONEDNN", False)
    ref_lp, ref_ent = chunked_logprobs(hidden, w, None, actions, mask, with_entropy=True, chunk_elements=96 * 4)
    ref_dh = torch.autograd.grad((ref_lp + 0.3 * ref_ent).sum(), hidden)[0]
    torch.testing.assert_close(dh, ref_dh, atol=1e-5, rtol=1e-5)
