"""posttrain.algos.names (what the config checks names against, without torch) holds exactly the registries'
names: a loss or estimator registered but not named there (or the reverse) fails here."""

from posttrain.algos import (
    ADVANTAGES,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    PREFERENCE_SPECS,
    ROLLOUT_CORRECTIONS,
    VALUE_LOSSES,
)
from posttrain.algos.kl import KL_GRADIENT as KL_GRADIENT_IN_KL
from posttrain.algos.names import KL_GRADIENT, NAMES


def test_names_are_exactly_the_registered_ones():
    registered = {"advantage": ADVANTAGES.names(), "policy_loss": POLICY_LOSSES.names(),
                  "kl_estimator": KL_ESTIMATORS.names(), "rollout_correction": ROLLOUT_CORRECTIONS.names(),
                  "loss_agg": AGG_MODES, "preference_loss": PREFERENCE_SPECS, "value_loss": VALUE_LOSSES.names()}
    assert set(registered) == set(NAMES)
    for kind, names in registered.items():
        assert sorted(NAMES[kind]) == sorted(names), kind
    assert set(NAMES["preference_loss"]) < set(PREFERENCE_LOSSES.names())  # + bradley_terry, the reward model's
    assert set(KL_GRADIENT) == set(NAMES["kl_estimator"]) and KL_GRADIENT_IN_KL is KL_GRADIENT
