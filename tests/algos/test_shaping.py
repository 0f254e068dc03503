"""DAPO's shaping functions vs plain loops of their equations."""

import pytest
import torch

from posttrain.algos.shaping import informative_groups, overlong_penalty, truncation_loss_mask


@pytest.mark.parametrize("max_len,buffer,factor", [(20, 4, 1.0), (20, 20, 0.5), (7, 1, 2.0)])
def test_overlong_penalty_matches_loop(max_len, buffer, factor):
    lengths = torch.arange(0, max_len + 3)
    got = overlong_penalty(lengths, max_len, buffer, factor)
    expected = []
    for n in lengths.tolist():  # DAPO eq. 13
        if n <= max_len - buffer:
            expected.append(0.0)
        elif n <= max_len:
            expected.append(factor * ((max_len - buffer) - n) / buffer)
        else:
            expected.append(-factor)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_overlong_penalty_rejects_a_bad_buffer():
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([3]), 5, 0)


@pytest.mark.parametrize("seed", range(5))
def test_informative_groups_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    G = 4
    scores = torch.randint(0, 2, (6 * G,), generator=g).float()
    got = informative_groups(scores, G).tolist()
    expected = [len(set(scores[i * G:(i + 1) * G].tolist())) > 1 for i in range(6)]
    assert got == expected


def test_informative_groups_needs_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(torch.zeros(6), 4)


def test_truncation_loss_mask_matches_loop():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(5, 6, generator=g) > 0.3).float()
    finished = torch.tensor([True, False, True, False, True])
    got = truncation_loss_mask(mask, finished)
    expected = [[mask[i, t].item() if finished[i] else 0.0 for t in range(6)] for i in range(5)]
    assert got.tolist() == expected and got.dtype == mask.dtype
