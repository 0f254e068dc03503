"""Named RL algorithms as settings of the one RL loop: `rl.preset: dapo` expands to the rows below.

An algorithm is a choice of an advantage estimator, a policy loss (and its clip range), a KL estimator,
placement and coefficient, a loss aggregation mode and DAPO's extras; nothing in the loop depends on a
preset's name. A preset only fills the keys the user left out, so `rl.preset=grpo rl.kl_coef=0` is GRPO
without the KL term. Settings a preset does not name (learning rate, batch sizes, epochs, group size,
lengths) keep RunConfig's defaults. docs/algorithms.md gives each preset's equations and references.
"""

from __future__ import annotations

_COMMON = {"policy_loss": "ppo_clip", "clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip_c": None,
           "kl_placement": "loss", "kl_estimator": "k3+", "kl_coef": 0.0, "whiten_advantages": False,
           "dynamic_sampling": False, "overlong_buffer_frac": 0.0, "mask_truncated": False, "gamma": 1.0}

PRESETS: dict[str, dict] = {
    # DeepSeekMath (Shao et al. 2024) sec. 4.1: group-normalised outcome advantage, PPO clip 0.2, KL to the
    # reference in the loss with the k3 estimator and beta = 0.04, per-sequence token averages. Kept as the paper
    # has it: k3 in the loss has the expected gradient of the *forward* KL(pi_ref || pi), not of the reverse
    # KL(pi || pi_ref) the paper's eq. 3 writes; rl.kl_estimator=k3+ keeps k3's value with the reverse KL's
    # gradient (docs/algorithms.md, "KL estimators").
    "grpo": {**_COMMON, "advantage": "grpo", "loss_agg": "seq-mean-token-mean", "kl_estimator": "k3",
             "kl_coef": 0.04},
    # Liu et al. 2025 ("Understanding R1-Zero-Like Training"): no std division, no 1/|o_i| (token sums over a
    # constant, the longest response), no KL term.
    "dr_grpo": {**_COMMON, "advantage": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm"},
    # Yu et al. 2025: clip-higher (0.2, 0.28), token-level loss, no KL, dynamic sampling, soft overlong
    # punishment over the last 20 % of the length budget (paper: 4,096 of 20,480 tokens).
    "dapo": {**_COMMON, "advantage": "grpo", "loss_agg": "token-mean", "clip_eps_high": 0.28,
             "dynamic_sampling": True, "overlong_buffer_frac": 0.2, "overlong_penalty_factor": 1.0},
    # Ahmadian et al. 2024 ("Back to Basics"): REINFORCE with the leave-one-out baseline on the whole
    # sequence (token log-probs summed), KL penalty in the reward.
    "rloo": {**_COMMON, "advantage": "rloo", "policy_loss": "reinforce", "loss_agg": "seq-mean-token-sum",
             "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.05},
    # Hu et al. 2025: PPO's clipped loss without a critic; per-token KL penalty in the reward; the discounted
    # return normalised over the global batch.
    "reinforce_pp": {**_COMMON, "advantage": "reinforce_pp", "loss_agg": "token-mean",
                     "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.01},
    # Li et al. 2024: REINFORCE with the reward of the greedy response as the baseline, KL in the reward.
    "remax": {**_COMMON, "advantage": "remax", "policy_loss": "reinforce", "loss_agg": "seq-mean-token-sum",
              "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.01},
    # Zheng et al. 2025: a sequence-level importance ratio (geometric mean of token ratios) clipped to
    # [1 - 3e-4, 1 + 4e-4], GRPO advantages, per-sequence token averages, no KL.
    "gspo": {**_COMMON, "advantage": "grpo", "policy_loss": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4,
             "loss_agg": "seq-mean-token-mean"},
    # Ouyang et al. 2022 / Ziegler et al. 2019: a critic and GAE (gamma 1, lambda 0.95), whitened advantages,
    # per-token KL penalty (k1) in the reward, clipped policy and value losses, 4 epochs per batch.
    "ppo": {**_COMMON, "advantage": "gae", "loss_agg": "token-mean", "kl_placement": "reward",
            "kl_estimator": "k1", "kl_coef": 0.05, "whiten_advantages": True, "lam": 0.95, "ppo_epochs": 4,
            "value_loss": "clipped", "value_clip": 0.2},
}


def expand_preset(rl: dict) -> dict:
    """The `rl` section with its preset's settings under the keys the user did not set."""
    name = rl.get("preset")
    if name is None:
        return rl
    if name not in PRESETS:
        import difflib  # noqa: PLC0415

        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"rl.preset must be one of {', '.join(PRESETS)}{hint}")
    return {**PRESETS[name], **rl}
