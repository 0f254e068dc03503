"""Registry behaviour and the one-signature-per-registry rule."""

import inspect

import pytest

from posttrain.algos import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, VALUE_LOSSES, Registry, UnknownNameError


def make():
    reg = Registry("widget")

    @reg.register("alpha")
    def alpha():
        return "a"

    @reg.register("beta_two")
    def beta_two():
        return "b"

    return reg, alpha


def test_register_get_names_contains():
    reg, alpha = make()
    assert reg.get("alpha") is alpha and reg.get("alpha")() == "a"
    assert reg.names() == ("alpha", "beta_two")
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 2


def test_duplicate_name_is_rejected():
    reg, _ = make()
    with pytest.raises(ValueError, match="alpha"):
        reg.register("alpha")(lambda: None)


def test_unknown_name_error_suggests_closest_and_lists_valid_names():
    reg, _ = make()
    with pytest.raises(UnknownNameError) as err:
        reg.get("beta_tow")
    msg = str(err.value)
    assert "widget" in msg and "'beta_tow'" in msg
    assert "did you mean 'beta_two'?" in msg
    assert "alpha, beta_two" in msg
    assert "\n" not in msg
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_unknown_name_without_close_match_has_no_suggestion():
    reg, _ = make()
    with pytest.raises(KeyError) as err:
        reg.get("zzzzzz")
    assert "did you mean" not in str(err.value)
    assert "alpha, beta_two" in str(err.value)


def test_real_registry_suggestion():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        ADVANTAGES.get("gpro")


@pytest.mark.parametrize("registry", [ADVANTAGES, POLICY_LOSSES, VALUE_LOSSES, KL_ESTIMATORS])
def test_one_signature_per_registry(registry):
    signatures = {name: inspect.signature(registry.get(name)) for name in registry.names()}
    first = next(iter(signatures.values()))
    for name, sig in signatures.items():
        assert sig == first, f"{registry.kind} {name!r} has signature {sig}, expected {first}"
