"""Chunked log-probabilities and entropy (issue 17): the same values and gradients as the full-vocabulary
computation, and no (B, T, V) tensor is ever allocated, forward or backward."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from posttrain.models.logprobs import chunked_logprobs

B, T, C, V = 3, 7, 16, 50


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns (numel) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    actions = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0      # right padding
    mask[1, 2:4] = 0     # a hole (tool output inside a response)
    mask[2, 0] = 0
    return hidden, weight, bias, actions, mask


def plain(hidden, weight, bias, actions, mask, temperature):
    logp = F.log_softmax((hidden @ weight.T + bias) / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask, -(logp.exp() * logp).sum(-1) * mask


def grads(fn, hidden, weight, bias):
    lp, ent = fn()
    (lp.sum() * 1.3 - 0.7 * ent.sum()).backward()
    out = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    return lp.detach(), ent.detach(), out


def test_values_and_gradients_equal_the_full_vocabulary_computation():
    hidden, weight, bias, actions, mask = inputs()
    for temperature in (1.0, 0.7):
        want = grads(lambda: plain(hidden, weight, bias, actions, mask, temperature), hidden, weight, bias)
        for chunk, keep in ((V * 4, 0), (V * 4, 10 ** 9), (V * 1000, 0)):  # several chunks (recomputed in
            # backward, or their log-softmax kept), and one
            got = grads(lambda: chunked_logprobs(hidden, weight, bias, actions, mask, temperature, True, chunk, keep),
                        hidden, weight, bias)
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
            for g, w in zip(got[2], want[2]):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            assert torch.all(got[0][mask == 0] == 0) and torch.all(got[1][mask == 0] == 0)


def test_without_entropy_and_without_grad():
    hidden, weight, bias, actions, mask = inputs(1)
    with torch.no_grad():
        lp, ent = chunked_logprobs(hidden, weight, None, actions, mask, 1.0, False, V * 2)
        want, _ = plain(hidden, weight, torch.zeros(V), actions, mask, 1.0)
    assert ent is None
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)


def test_no_batch_by_length_by_vocab_tensor_forward_or_backward():
    hidden, weight, bias, actions, mask = inputs(2)
    full = B * T * V
    with LargestTensor() as seen:
        lp, ent = plain(hidden, weight, bias, actions, mask, 1.0)
        (lp.sum() + ent.sum()).backward()
    assert seen.largest >= full  # the check can fail: the plain computation does hold (B, T, V)
    chunk = V * 4
    with LargestTensor() as seen:
        lp, ent = chunked_logprobs(hidden, weight, bias, actions, mask, 1.0, True, chunk)
        (lp.sum() + ent.sum()).backward()
    assert seen.largest <= max(chunk, V * C), (seen.largest, full)


def test_the_written_out_gradient_equals_autograds_kept_or_recomputed():
    """The RL update's path (autograd, no entropy, float32): `_HeadLogprobs`, whose backward is written out, gives
    the gradient of the full-vocabulary computation for any upstream gradient, with the log-softmax outputs kept
    (keep_elements large) or recomputed per chunk (0), for one chunk and several, with and without a bias."""
    hidden, weight, bias, actions, mask = inputs(3)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(9))  # not all ones: a real weighting

    def run(fn):
        lp = fn()[0]
        (lp * upstream).sum().backward()
        out = [None if t is None else t.grad.clone() for t in (hidden, weight, b)]
        for t in (hidden, weight, b):
            if t is not None:
                t.grad = None
        return lp.detach(), out

    for b in (bias, None):
        for temperature in (1.0, 0.7):
            want = run(lambda: plain(hidden, weight, torch.zeros(V) if b is None else b, actions, mask, temperature))
            for chunk in (V * 4, V * 1000):
                for keep in (0, 10 ** 9):
                    got = run(lambda: chunked_logprobs(hidden, weight, b, actions, mask, temperature, False, chunk, keep))
                    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
                    for g, w in zip(got[1], want[1]):
                        if w is not None:
                            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_the_written_out_gradient_is_pushed_the_right_way_and_used_once():
    """A step along the gradient of sum(log pi(a)) raises every chosen token's log-prob (the sign of dL/dz is
    right), and a second backward through the same graph is refused (its buffers became the gradient)."""
    hidden, weight, _, actions, mask = inputs(4)
    lp, _ = chunked_logprobs(hidden, weight, None, actions, mask, 1.0, False, V * 4)
    lp.sum().backward(retain_graph=True)
    with torch.no_grad():
        after, _ = chunked_logprobs(hidden + 0.05 * hidden.grad, weight + 0.05 * weight.grad, None, actions, mask,
                                    1.0, False, V * 4)
    assert torch.all(after[mask == 1] > lp.detach()[mask == 1])
    try:
        lp.sum().backward()
    except RuntimeError as err:
        assert "once already" in str(err)
    else:
        raise AssertionError("a second backward went through")


def test_the_log_softmax_written_over_the_logits_equals_the_out_of_place_one():
    """Outside autograd `_log_softmax` overwrites its logits (one (n, V) buffer, not two): torch's kernel reads a
    row's maximum and sum before it writes, so the values are F.log_softmax's bit for bit (a torch whose kernel
    did not would fail here), at temperature 1 and not."""
    from posttrain.models.logprobs import _log_softmax

    g = torch.Generator().manual_seed(8)
    w, h = torch.randn(5000, 24, generator=g), torch.randn(37, 24, generator=g)
    for tau in (1.0, 0.7):
        with torch.no_grad():
            got = _log_softmax(h, w, None, tau, None)
        assert torch.equal(got, F.log_softmax(F.linear(h, w) / tau, dim=-1))
    h.requires_grad_(True)  # under autograd: out of place, differentiable
    assert _log_softmax(h, w, None, 0.7, None).grad_fn is not None


def test_under_bf16_autocast_the_written_out_head_computes_as_autocasts_f_linear(monkeypatch):
    """bf16 mixed precision: `_HeadLogprobs` serves the update's call too, its three products in bf16 on W cast
    once (not per chunk), the softmax and dL/dz in float32. Values and gradients agree with autocast's
    full-vocabulary computation (F.linear in bf16, log_softmax in float32) to bf16 rounding, and with float32's
    to a few bf16 ulps, kept and recomputed, with and without entropy, whatever number of chunks the backward's dh
    and dW products gather; W's gradient is float32."""
    from posttrain.models import logprobs
    from posttrain.models.packed import weights_fixed

    served = []
    apply = logprobs._HeadLogprobs.apply
    monkeypatch.setattr(logprobs._HeadLogprobs, "apply", lambda *a: (served.append(a[-1]), apply(*a))[1])
    hidden, weight, bias, actions, mask = inputs(5)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(2))

    def run(fn, with_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = fn(with_entropy)
        ((lp * upstream).sum() - (0.5 * ent.sum() if with_entropy else 0)).backward()
        out = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        return lp.detach(), out

    def autocast_plain(with_entropy):
        logp = F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)  # autocast: bf16 product
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask, -(logp.exp() * logp).sum(-1) * mask

    for with_entropy in (False, True):
        want = run(autocast_plain, with_entropy)
        exact = grads(lambda: plain(hidden, weight, bias, actions, mask, 1.0), hidden, weight, bias)
        # kept and recomputed; dL/dz gathered one chunk, two chunks (a partial last group) or all of them at a time
        for keep, group in ((0, V * 4), (10 ** 9, V * 8), (0, V * 8), (10 ** 9, 10 ** 9)):
            monkeypatch.setattr(logprobs, "LOW_GROUP_ELEMENTS", group)
            got = run(lambda e: chunked_logprobs(hidden, weight, bias, actions, mask, 1.0, e, V * 4, keep), with_entropy)
            assert served[-1] is not None and served[-1].dtype == torch.bfloat16
            torch.testing.assert_close(got[0], want[0], atol=3e-2, rtol=0)
            for g, w in zip(got[1], want[1]):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)
            assert (got[0] - exact[0]).abs().max() < 5e-2
    with weights_fixed():  # one cast per block; a new one once the weight changed
        first = logprobs.autocast_head(weight) if torch.is_autocast_enabled("cpu") else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = logprobs.autocast_head(weight), logprobs.autocast_head(weight)
            with torch.no_grad():
                weight.add_(1.0)
            c = logprobs.autocast_head(weight)
        assert first is None and a is b and not torch.equal(c, a)
    assert logprobs.autocast_head(weight) is None  # autocast off: the float32 path
