"""The exact expected gradient of every KL estimator in both placements, on a 7-way categorical.

pi = softmax(theta), pi_ref fixed; samples x ~ pi, no gradient through the sampling (on-policy). Enumerating the
support gives the expectations exactly:

    loss placement   (beta * k(x) added to the loss)      E_pi[grad k(x)]           = sum_x pi(x) grad k(x)
    reward placement (r(x) -= beta * k(x), REINFORCE)     E_pi[k(x) grad log pi(x)] = sum_x pi(x) k(x) grad log pi(x)

compared with the gradient of KL(pi || pi_ref) = sum_x pi(x) (log pi(x) - log pi_ref(x)) w.r.t. theta (and, for k3 in
the loss, with that of the forward KL(pi_ref || pi)). docs/algorithms.md's table is `gradient_table()` printed.
"""

import pytest
import torch

from posttrain.algos import KL_ESTIMATORS
from posttrain.algos.kl import KL_GRADIENT

K = 7


def categorical(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)


def grad_of(f, theta: torch.Tensor) -> torch.Tensor:
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t)
    return g


def expected_gradient(name: str, placement: str, theta, ref_logits) -> torch.Tensor:
    """The exact E_pi of the estimator's gradient contribution in `placement`, by enumerating the K outcomes."""
    est, log_ref = KL_ESTIMATORS.get(name), ref_logits.log_softmax(-1)

    def loss(t):  # sum_x sg(pi(x)) k(x): the sample weights carry no gradient
        log_pi = t.log_softmax(-1)
        return (log_pi.exp().detach() * est(log_pi, log_ref)).sum()

    def reward(t):  # sum_x sg(pi(x) k(x)) log pi(x): the score-function term of a reward -k
        log_pi = t.log_softmax(-1)
        return (log_pi.exp().detach() * est(log_pi, log_ref).detach() * log_pi).sum()

    return grad_of(loss if placement == "loss" else reward, theta)


def kl_gradients(theta, ref_logits) -> dict[str, torch.Tensor]:
    log_ref = ref_logits.log_softmax(-1)

    def reverse(t):
        log_pi = t.log_softmax(-1)
        return (log_pi.exp() * (log_pi - log_ref)).sum()

    def forward(t):
        log_pi = t.log_softmax(-1)
        return (log_ref.exp() * (log_ref - log_pi)).sum()

    return {"reverse": grad_of(reverse, theta), "forward": grad_of(forward, theta)}


def gradient_table(seed: int = 0) -> list[tuple[str, str, float, float]]:
    """(estimator, placement, max |E grad - grad KL(pi||ref)|, max |E grad - grad KL(ref||pi)|) for every case."""
    theta, ref = categorical(seed)
    exact = kl_gradients(theta, ref)
    rows = []
    for name in KL_ESTIMATORS.names():
        for placement in ("loss", "reward"):
            g = expected_gradient(name, placement, theta, ref)
            rows.append((name, placement, (g - exact["reverse"]).abs().max().item(),
                         (g - exact["forward"]).abs().max().item()))
    return rows


def test_every_estimator_is_in_the_gradient_table():
    assert set(KL_GRADIENT) == set(KL_ESTIMATORS.names())


def test_the_default_placement_and_estimator_give_the_reverse_kl_gradient():
    from posttrain.config import RLConfig

    c = RLConfig()
    theta, ref = categorical(0)
    got = expected_gradient(c.kl_estimator, c.kl_placement, theta, ref)
    exact = kl_gradients(theta, ref)["reverse"]
    assert exact.norm() > 0.1  # a case where the gradients are far from 0
    assert (got - exact).abs().max() < 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k3+"])
@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_each_case_gives_the_gradient_the_table_says(seed, name, placement):
    theta, ref = categorical(seed)
    got = expected_gradient(name, placement, theta, ref)
    exact = kl_gradients(theta, ref)
    kind = KL_GRADIENT[name][placement]
    if kind == "zero":
        assert got.abs().max() < 1e-12
    elif kind in exact:
        assert (got - exact[kind]).abs().max() < 1e-8
    else:  # biased: the gradient of neither KL
        assert min((got - g).abs().max() for g in exact.values()) > 1e-3


def test_the_straight_through_estimator_has_k3s_value_and_k2s_gradient():
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    st = KL_ESTIMATORS.get("k3+")(lp, ref)
    assert torch.equal(st.detach(), KL_ESTIMATORS.get("k3")(lp.detach(), ref))
    (got,) = torch.autograd.grad(st.sum(), lp)
    (want,) = torch.autograd.grad(KL_ESTIMATORS.get("k2")(lp, ref).sum(), lp)
    assert torch.equal(got, want)


if __name__ == "__main__":  # the table in docs/algorithms.md
    theta, ref = categorical(0)
    print(f"|grad KL(pi||ref)| = {kl_gradients(theta, ref)['reverse'].norm():.4f}, "
          f"|grad KL(ref||pi)| = {kl_gradients(theta, ref)['forward'].norm():.4f}")
    log_pi, log_ref = theta.log_softmax(-1), ref.log_softmax(-1)
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    for name, placement, rev, fwd in gradient_table(0):
        bias = (log_pi.exp() * KL_ESTIMATORS.get(name)(log_pi, log_ref)).sum() - kl
        print(f"{name:4s} {placement:6s} value bias {bias:+.3e}  vs reverse {rev:.3e}  vs forward {fwd:.3e}")
