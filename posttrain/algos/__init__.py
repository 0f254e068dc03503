"""Pure torch algorithm pieces: advantage estimators, policy/value losses, KL, rollout corrections, the loss
reduction."""

from .advantages import ADVANTAGES
from .aggregation import AGG_MODES, aggregate
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from .policy_losses import POLICY_LOSSES
from .preference import PREFERENCE_LOSSES, PREFERENCE_SPECS
from .registry import Registry, UnknownNameError
from .rollout_correction import ROLLOUT_CORRECTIONS
from .utils import masked_mean, masked_whiten
from .value_losses import VALUE_LOSSES

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "PREFERENCE_SPECS",
    "ROLLOUT_CORRECTIONS",
    "VALUE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "Registry",
    "UnknownNameError",
    "aggregate",
    "masked_mean",
    "masked_whiten",
]
