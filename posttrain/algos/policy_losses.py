"""Policy losses: one signature, one registry, per-token loss + metrics.

    per_token_loss, metrics = POLICY_LOSSES.get(name)(
        logprobs, old_logprobs, advantages, response_mask, *,
        clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05)

    logprobs       (B, T)  log pi_theta(a_t | s_t), with grad
    old_logprobs   (B, T)  log pi_old(a_t | s_t): the policy before this update, no grad
    advantages     (B, T)  A_t, no grad
    response_mask  (B, T)  {0, 1} float or bool
    -> per_token_loss (B, T), zero outside the mask (reduce it with `aggregate`);
       metrics: dict of detached scalars, masked token means over this batch.

A loss ignores the keyword arguments it has no use for (each says which it reads). Registered: ppo_clip, gspo,
reinforce, cispo, gmpo, sapo.

Sign convention: the loss is the *negated* objective, so minimising it ascends the objective.
The log-ratio is clamped to [-20, 20] before exp (as verl) so one stale token cannot overflow. Inputs are
zeroed outside the mask before any arithmetic, so garbage in padding (-inf logprobs, NaN) never reaches
the loss or its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry
from .utils import as_bool, masked_mean, zero_outside

POLICY_LOSSES = Registry("policy loss")

_MAX_LOG_RATIO = 20.0


def _ratio_metrics(log_ratio: Tensor, ratio: Tensor, m: Tensor) -> dict[str, Tensor]:
    """approx_kl = mean(old - new) (k1 of pi_theta vs pi_old), ratio_mean, ratio_max over valid tokens."""
    with torch.no_grad():
        return {
            "approx_kl": masked_mean(-log_ratio, m).detach(),
            "ratio_mean": masked_mean(ratio, m).detach(),
            "ratio_max": torch.where(m, ratio, torch.zeros_like(ratio)).max().detach(),
        }


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, m: Tensor, eps_low: float, eps_high: float,
                       dual_clip_c: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (and dual clip) on a given ratio (B, T); see `ppo_clip`."""
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg_unclipped, pg_clipped)
    metrics = {"clip_frac": masked_mean((pg_clipped > pg_unclipped).to(ratio.dtype), m).detach()}
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        bound = -dual_clip_c * advantages  # = c * |A| > 0 where A < 0
        negative = advantages < 0
        metrics["dual_clip_frac"] = masked_mean((negative & (loss > bound)).to(ratio.dtype), m).detach()
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    return zero_outside(loss, m), metrics


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), with decoupled "clip-higher" bounds
    (DAPO, Yu et al. 2025) and optional dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA
    Games with Deep RL", eq. 5):

        rho_t = exp(logprobs_t - old_logprobs_t)
        loss_t = max(-rho_t A_t, -clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)
        dual clip, only where A_t < 0:  loss_t = min(loss_t, -c A_t)        (c > 1)

    In objective form the dual clip is J_t = max(min(rho A, clip(rho) A), c A) for A < 0: when a bad
    action's ratio has grown large, -rho A > 0 would grow without bound, so the loss is capped at
    c |A| (and its gradient is zero there), exactly verl's `clip_ratio_c`.

    Args:
        logprobs, old_logprobs, advantages, response_mask: (B, T).
        clip_eps_low, clip_eps_high: the trust band [1 - eps_low, 1 + eps_high].
        dual_clip_c: c > 1 (typically 3), or None for no dual clip.
    Returns:
        per_token_loss (B, T) zero outside the mask; metrics: clip_frac (fraction of valid tokens where
        the clipped term is the active one: rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with
        A < 0), approx_kl, ratio_mean, ratio_max, and dual_clip_frac (tokens where the c |A| cap is
        active) when dual_clip_c is set.
    """
    m = as_bool(response_mask)
    advantages = zero_outside(advantages, m)
    log_ratio = zero_outside(logprobs - old_logprobs, m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss, metrics = _clipped_surrogate(ratio, advantages, m, clip_eps_low, clip_eps_high, dual_clip_c)
    return loss, {**metrics, **_ratio_metrics(log_ratio, ratio, m)}


@POLICY_LOSSES.register("gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 7 and 13-14):

        s_i    = exp( 1/|y_i| sum_t (logprobs_{i,t} - old_logprobs_{i,t}) )     sequence ratio
        s_i,t  = sg[s_i] * exp(logprobs_{i,t} - sg[logprobs_{i,t}])             value s_i, grad s_i * dlogp_t
        loss_i,t = max(-s_i,t A_i,t, -clip(s_i,t, 1 - eps_low, 1 + eps_high) A_i,t)   (+ dual clip as ppo_clip)

    With A_i,t = A_i for every token this is GSPO's sequence-level objective; per-token advantages are
    allowed. The paper clips far tighter than PPO (eps_low=3e-4, eps_high=4e-4): pass those explicitly,
    the defaults here are the registry's shared ones. The paper averages tokens per sequence first:
    reduce with `aggregate(..., "seq-mean-token-mean")` to match it.

    Args / Returns: as `ppo_clip`; ratio metrics are over s_i,t, clip_frac counts clipped tokens.
    """
    m = as_bool(response_mask)
    advantages, logprobs = zero_outside(advantages, m), zero_outside(logprobs, m)
    log_ratio = zero_outside(logprobs - old_logprobs, m)
    seq_log_ratio = masked_mean(log_ratio, m, dim=-1).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B,)
    ratio = torch.exp(seq_log_ratio.detach())[:, None] * torch.exp(logprobs - logprobs.detach())
    loss, metrics = _clipped_surrogate(ratio, advantages, m, clip_eps_low, clip_eps_high, dual_clip_c)
    return loss, {**metrics, **_ratio_metrics(log_ratio, ratio, m)}


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Vanilla policy gradient (Williams 1992, REINFORCE): loss_t = -A_t * logprobs_t.

    No ratio and no clipping (the clip arguments are ignored); exact only on-policy, i.e. a single
    update per rollout. old_logprobs only feed the monitoring metrics.

    Args / Returns: as `ppo_clip`; metrics: approx_kl, ratio_mean, ratio_max.
    """
    m = as_bool(response_mask)
    loss = -zero_outside(advantages, m) * zero_outside(logprobs, m)
    with torch.no_grad():
        log_ratio = zero_outside(logprobs - old_logprobs, m)
        ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return loss, _ratio_metrics(log_ratio, ratio, m)


@POLICY_LOSSES.register("cispo")
def cispo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    eqs. 4-5): clip the importance-sampling weight, not the update, and stop its gradient, so that every token
    keeps a gradient (PPO's clip drops the tokens outside the band; those are often the rare "fork" tokens):

        rho_t    = exp(logprobs_t - old_logprobs_t)
        w_t      = sg(clip(rho_t, 1 - eps_low, 1 + eps_high))
        loss_t   = -w_t A_t logprobs_t                       grad: -w_t A_t grad logprobs_t

    The paper normalises by the batch's token count (`aggregate(..., "token-mean")`) and effectively drops the
    lower bound (a large eps_low); here the bounds are clip_eps_low / clip_eps_high. The value of the loss
    (like `reinforce`'s) is not an objective estimate; its gradient is. dual_clip_c and the SAPO temperatures
    are ignored.

    Args / Returns: as `ppo_clip`; metrics: clip_frac (tokens whose weight is clipped, either side),
    approx_kl, ratio_mean, ratio_max.
    """
    m = as_bool(response_mask)
    advantages, logprobs = zero_outside(advantages, m), zero_outside(logprobs, m)
    log_ratio = zero_outside(logprobs - old_logprobs, m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high).detach()
    loss = zero_outside(-weight * advantages * logprobs, m)
    clipped = masked_mean((weight != ratio.detach()).to(ratio.dtype), m).detach()
    return loss, {"clip_frac": clipped, **_ratio_metrics(log_ratio, ratio, m)}


@POLICY_LOSSES.register("gmpo")
def gmpo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", eq. 3 and the authors' code): maximise the
    geometric mean of the token terms of a sequence instead of their arithmetic mean, which an outlier ratio
    moves less. With d_t = logprobs_t - old_logprobs_t and the clip in log space:

        c_{i,t} = min(d_t, clip(d_t, -eps_low, eps_high))   if A_{i,t} >= 0     (the pessimistic side, as PPO)
                  max(d_t, clip(d_t, -eps_low, eps_high))   if A_{i,t} < 0
        s_i     = exp( 1/|o_i| sum_t c_{i,t} )                                  geometric mean of the ratios
        loss_i,t = -A_{i,t} s_i                                                 (every token of sequence i)

    grad: d loss_i,t / d logprobs_{i,u} = -A_{i,t} s_i / |o_i| where c_{i,u} = d_u, else 0. With A_{i,t} = A_i
    and `aggregate(..., "seq-mean-token-mean")` this is the paper's 1/G sum_i -A_i s_i. The paper clips to
    (e^-0.4, e^0.4): pass clip_eps_low = clip_eps_high = 0.4 for it; the defaults here are the registry's
    shared ones. dual_clip_c and the SAPO temperatures are ignored.

    Args / Returns: as `ppo_clip`; ratio metrics are over the token ratios exp(d_t); clip_frac counts the
    tokens whose clipped log-ratio is the active one.
    """
    m = as_bool(response_mask)
    advantages, logprobs = zero_outside(advantages, m), zero_outside(logprobs, m)
    log_ratio = zero_outside(logprobs - old_logprobs, m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    clipped = log_ratio.clamp(-clip_eps_low, clip_eps_high)
    c = torch.where(advantages >= 0, torch.minimum(log_ratio, clipped), torch.maximum(log_ratio, clipped))
    seq_ratio = torch.exp(masked_mean(c, m, dim=-1))  # (B,)
    loss = zero_outside(-advantages * seq_ratio[:, None], m)
    active = masked_mean((c != log_ratio).to(c.dtype), m).detach()
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
    return loss, {"clip_frac": active, **_ratio_metrics(log_ratio, ratio, m)}


@POLICY_LOSSES.register("sapo")
def sapo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO (Gao et al. 2025, Qwen team, "Soft Adaptive Policy Optimization", arXiv 2511.20347): a smooth,
    temperature-controlled gate in place of the hard clip; the gradient fades as the ratio leaves 1 instead of
    dropping to 0 at a band's edge:

        rho_t   = exp(logprobs_t - old_logprobs_t)
        tau_t   = sapo_tau_pos if A_t > 0 else sapo_tau_neg                    (paper: 1.0 and 1.05)
        f_t     = sigmoid(tau_t (rho_t - 1)) * 4 / tau_t
        loss_t  = -f_t A_t
        grad:     -4 sigma_t (1 - sigma_t) rho_t A_t grad logprobs_t,   sigma_t = sigmoid(tau_t (rho_t - 1))

    At rho = 1 the gradient weight 4 sigma (1 - sigma) is 1 (PPO's on-policy gradient); tau_neg > tau_pos damps
    negative-advantage tokens faster. The paper averages tokens per sequence (`aggregate(...,
    "seq-mean-token-mean")`). The clip arguments are ignored.

    Args / Returns: as `ppo_clip`; metrics: gate_mean (token mean of 4 sigma (1 - sigma), the gradient weight
    relative to PPO's unclipped one), approx_kl, ratio_mean, ratio_max.
    """
    m = as_bool(response_mask)
    advantages = zero_outside(advantages, m)
    log_ratio = zero_outside(logprobs - old_logprobs, m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, sapo_tau_pos), torch.full_like(ratio, sapo_tau_neg))
    sigma = torch.sigmoid(tau * (ratio - 1.0))
    loss = zero_outside(-sigma * (4.0 / tau) * advantages, m)
    gate = masked_mean((4.0 * sigma * (1.0 - sigma)).detach(), m)
    return loss, {"gate_mean": gate, **_ratio_metrics(log_ratio, ratio, m)}
