"""Pure torch algorithm pieces: advantage estimators, policy/value losses, KL, rollout corrections, the loss
reduction.

The names below load their module on first use (PEP 562), so `posttrain.algos.names` (the registries' names as
plain data, what the config checks against) imports without torch."""

from __future__ import annotations

import importlib

_WHERE = {
    "ADVANTAGES": "advantages",
    "AGG_MODES": "aggregation",
    "aggregate": "aggregation",
    "KL_ESTIMATORS": "kl",
    "AdaptiveKLController": "kl",
    "FixedKLController": "kl",
    "POLICY_LOSSES": "policy_losses",
    "PREFERENCE_LOSSES": "preference",
    "PREFERENCE_SPECS": "preference",
    "Registry": "registry",
    "UnknownNameError": "registry",
    "ROLLOUT_CORRECTIONS": "rollout_correction",
    "masked_mean": "utils",
    "masked_whiten": "utils",
    "VALUE_LOSSES": "value_losses",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'posttrain.algos' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"posttrain.algos.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
