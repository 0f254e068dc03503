"""KL(pi || pi_ref) estimators and KL-coefficient controllers.

Estimators (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html), per
token, for actions sampled from pi. With log r = ref_logprobs - logprobs = log pi_ref(a) / pi(a):

    k1  = -log r                     value: unbiased, high variance, can be negative
    k2  = 0.5 * (log r)^2            value: biased (>= 0, exact to second order), low variance
    k3  = (r - 1) - log r            value: unbiased, low variance, >= 0
    k3+ = k3's value, k2's gradient  (straight-through: k2 - sg(k2) + sg(k3); verl's "k3+")

An estimator's *value* being unbiased says nothing about its *gradient* (Tang & Munos 2025, "On a few pitfalls
in KL divergence gradient estimation for RL"). On-policy (samples from pi, no gradient through the sampling),
the expected gradient with respect to the policy's parameters is, exactly:

    placement  k1                 k2                 k3                        k3+
    loss       0 (only noise)     grad KL(pi||ref)   grad KL(ref||pi) (forward)  grad KL(pi||ref)
    reward     grad KL(pi||ref)   biased             biased                    biased (= k3's)

("loss": beta * k_t added to the per-token loss, E_pi[grad k]; "reward": r_t -= beta * k_t before the
advantages, E_pi[k grad log pi], REINFORCE's score-function term.) `KL_GRADIENT` holds this table; the config
refuses k1 in the loss and the loop warns about k2/k3/k3+ in the reward. tests/algos/test_kl_gradients.py
computes each case on a 7-way categorical.

Registry signature: fn(logprobs (B, T), ref_logprobs (B, T)) -> (B, T). Masking and reduction are the
caller's (`aggregate`, or `masked_mean` for a metric).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .names import KL_GRADIENT  # noqa: F401 (the table lives with the names, torch-free)
from .registry import Registry

KL_ESTIMATORS = Registry("KL estimator")

K3_LOG_RATIO_CLAMP = 20.0



@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logprobs - ref_logprobs.  (B, T), (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (logprobs - ref_logprobs)^2.  (B, T), (B, T) -> (B, T).

    grad k2 = (logprobs - ref_logprobs) grad logprobs, whose expectation under pi is grad KL(pi || pi_ref)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1.  (B, T), (B, T) -> (B, T).

    grad k3 = (1 - pi_ref/pi) grad logprobs, whose expectation under pi is -sum_a pi_ref(a) grad log pi(a) =
    grad KL(pi_ref || pi): in the loss, k3 pulls along the forward KL's gradient, not the reverse KL's.

    The log-ratio (ref - logp) is clamped to [-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP] = [-20, 20] first
    so a token the policy has made near-impossible under pi_ref cannot overflow exp() into inf/NaN; this
    only changes tokens with |log ratio| > 20 (and zeroes their gradient).
    """
    log_r = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.exp(log_r) - log_r - 1.0


@KL_ESTIMATORS.register("k3+")
def kl_k3_straight_through(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3+ = k2 - sg(k2) + sg(k3): the value of k3 (unbiased, >= 0), the gradient of k2 (the reverse KL's in
    expectation). (B, T), (B, T) -> (B, T). verl's "k3+" (low_var_kl with the straight-through trick); Tang &
    Munos 2025. The value is k3's exactly (k2 - sg(k2) is 0 in floating point)."""
    k2 = kl_k2(logprobs, ref_logprobs)
    return k2 - k2.detach() + kl_k3(logprobs, ref_logprobs).detach()


def _as_float(x: float | Tensor) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


class FixedKLController:
    """A constant KL coefficient beta. `update` does nothing."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", sec. 2.2): drive the measured KL towards `target`.

        e    = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    KL above target raises beta, below lowers it; `n_steps` is the number of samples (or steps) since
    the last update and `horizon` sets how many of them a full 20 % correction takes.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(_as_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
