"""posttrain.models.lean_ops: RMSNorm and SwiGLU that keep only their inputs for the backward pass. Forward values
bit-identical to the plain ops, gradients equal to autograd's (and to finite differences in float64), and less
kept for the backward pass."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.models.lean_ops import rms_norm, swiglu


def plain_rms_norm(x, w, eps):
    return F.rms_norm(x, (x.size(-1),), w, eps)


def plain_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def kept_bytes(fn, *inputs):
    """Bytes of distinct storages autograd keeps for the backward pass of fn(*inputs), inputs excluded."""
    storages = {}
    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    for t in inputs:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def test_rms_norm_matches_the_plain_op_and_its_gradient():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 16) * 3).requires_grad_()
    w = (torch.randn(16) + 1).requires_grad_()
    dy = torch.randn(3, 5, 16)
    y = rms_norm(x, w, 1e-6)
    ref = plain_rms_norm(x, w, 1e-6)
    assert torch.equal(y, ref)  # the same forward call
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(dx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, rw, rtol=1e-5, atol=1e-5)
    # the direction is right, not only the size: a small step along -dx lowers <dy, y> as the plain op's does
    with torch.no_grad():
        before = (plain_rms_norm(x, w, 1e-6) * dy).sum()
        after = (plain_rms_norm(x - 1e-3 * dx, w, 1e-6) * dy).sum()
    assert after < before


def test_swiglu_matches_the_plain_op_and_its_gradient():
    torch.manual_seed(1)
    gate_up = (torch.randn(4, 7, 24) * 2).requires_grad_()
    dy = torch.randn(4, 7, 12)
    y = swiglu(gate_up)
    assert torch.equal(y, plain_swiglu(gate_up))
    (d,) = torch.autograd.grad(y, gate_up, dy)
    (r,) = torch.autograd.grad(plain_swiglu(gate_up), gate_up, dy)
    torch.testing.assert_close(d, r, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    g = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (g,))


def test_bf16_gradients_close_to_float32():
    torch.manual_seed(3)
    gate_up = torch.randn(64, 32)
    dy = torch.randn(64, 16)
    g64 = gate_up.double().requires_grad_()
    (exact,) = torch.autograd.grad(plain_swiglu(g64), g64, dy.double())
    gb = gate_up.bfloat16().requires_grad_()
    (mine,) = torch.autograd.grad(swiglu(gb), gb, dy.bfloat16())
    gp = gate_up.bfloat16().requires_grad_()
    (plain,) = torch.autograd.grad(plain_swiglu(gp), gp, dy.bfloat16())
    # computed in float32 and rounded once: no further from the exact gradient than autograd's bf16 ops
    assert (mine.double() - exact).abs().mean() <= (plain.double() - exact).abs().mean() * 1.01


@pytest.mark.parametrize("grad", [True, False])
def test_keeps_less_for_the_backward_pass(grad):
    x = torch.randn(32, 64, requires_grad=grad)
    w = torch.ones(64, requires_grad=grad)
    gate_up = torch.randn(32, 128, requires_grad=grad)
    if not grad:  # without autograd nothing is kept by either
        assert kept_bytes(lambda a, b: rms_norm(a, b, 1e-6), x, w) == 0
        return
    # the plain rms_norm keeps its normalised output as well; this one keeps x and w (the inputs) only
    assert kept_bytes(lambda a, b: rms_norm(a, b, 1e-6), x, w) == 0
    assert kept_bytes(lambda a, b: plain_rms_norm(a, b, 1e-6), x, w) >= x.numel() * 4
    assert kept_bytes(swiglu, gate_up) == 0
    assert kept_bytes(plain_swiglu, gate_up) >= 32 * 64 * 4  # silu(gate)
