"""The training invariants: each passes on good input and fails loudly, in one line, on bad input."""

import math

import pytest
import torch

from posttrain.errors import InvariantError
from posttrain.invariants import check_finite, check_mask_not_empty, check_ratio_is_one


def test_ratio_check_measures_only_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, 5.0]])
    old = torch.tensor([[-1.0, -2.0005, -9.0]])  # last token is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert check_ratio_is_one(logp, old, mask, 1e-3) == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(InvariantError, match=r"max \|log pi - log pi_old\| = 0.0005 > rl.ratio_tolerance=0.0001"):
        check_ratio_is_one(logp, old, mask, 1e-4)
    assert check_ratio_is_one(logp, old, torch.zeros_like(mask), 1e-9) == 0.0


def test_ratio_check_catches_nan():
    with pytest.raises(InvariantError, match="nan"):
        check_ratio_is_one(torch.tensor([[math.nan]]), torch.zeros(1, 1), torch.ones(1, 1), 1.0)


def test_empty_mask_fails():
    check_mask_not_empty(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(InvariantError, match="response mask is empty"):
        check_mask_not_empty(torch.zeros(2, 3))


def test_finite_check_ignores_padding_and_names_the_rows():
    x = torch.tensor([[1.0, math.inf], [math.nan, 0.0]])
    check_finite(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "advantages")
    with pytest.raises(InvariantError, match=r"2 non-finite advantages in sequences \[0, 1\]"):
        check_finite(x, torch.ones(2, 2), "advantages")
