"""The names every registry of posttrain.algos holds, as plain data: what the config checks a name against
without importing torch (a config error must stay fast: `posttrain rl bad.yaml` answers before torch loads).

tests/algos/test_names.py checks that these are exactly the registries' names, so the two cannot drift: a new
estimator or loss is registered in its module and named here.
"""

from __future__ import annotations

NAMES: dict[str, tuple[str, ...]] = {
    "advantage": ("dr_grpo", "gae", "grpo", "reinforce_pp", "reinforce_pp_baseline", "remax", "rloo"),
    "policy_loss": ("cispo", "gmpo", "gspo", "ppo_clip", "reinforce", "sapo"),
    "kl_estimator": ("k1", "k2", "k3", "k3+"),
    "rollout_correction": ("icepop", "mis", "tis"),
    "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "preference_loss": ("dpo", "ipo", "slic", "simpo"),
    "value_loss": ("clipped", "unclipped"),
}

# KL estimator -> placement -> the expected gradient it gives on-policy (posttrain.algos.kl's table): "reverse"
# (of KL(pi || pi_ref), what the penalty means), "forward" (of KL(pi_ref || pi)), "zero", or "biased" (the
# gradient of no KL).
KL_GRADIENT: dict[str, dict[str, str]] = {
    "k1": {"loss": "zero", "reward": "reverse"},
    "k2": {"loss": "reverse", "reward": "biased"},
    "k3": {"loss": "forward", "reward": "biased"},
    "k3+": {"loss": "reverse", "reward": "biased"},
}
