"""Atomic checkpoints: round trip, rotation, and detection of truncated or corrupted files."""

import random

import numpy as np
import pytest
import torch

from posttrain.train.checkpoint import (global_rng_state, latest_checkpoint, load_checkpoint, remove_temporaries, save_checkpoint, set_global_rng_state, verify_checkpoint)


def weights(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g)
    return {"policy": {"embed.weight": w, "lm_head.weight": w, "norm": torch.randn(3, generator=g)}}


def state(step):
    return {"step": step, "rng": random.Random(step).getstate(), "gen": torch.Generator().manual_seed(step).get_state(),
            "nested": {"order": [3, 1, 2], "coef": 0.5}}


def test_round_trip_is_exact_and_tied_weights_survive(tmp_path):
    path = save_checkpoint(tmp_path, "rl", 7, weights(0), state(7))
    assert path.name == "000001-rl-000007" and verify_checkpoint(path) is None
    manifest, w, s = load_checkpoint(path)
    assert manifest["phase"] == "rl" and manifest["step"] == 7
    for k, v in weights(0)["policy"].items():
        assert torch.equal(w["policy"][k], v)
    assert s["nested"] == {"order": [3, 1, 2], "coef": 0.5}
    r = random.Random()
    r.setstate((s["rng"][0], tuple(s["rng"][1]), s["rng"][2]))
    assert r.random() == random.Random(7).random()
    assert torch.equal(s["gen"], torch.Generator().manual_seed(7).get_state())


def test_only_the_newest_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, "sft", step, weights(step), state(step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["000004-sft-000004", "000005-sft-000005"]
    assert latest_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "000005-sft-000005", [])


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage):
    save_checkpoint(tmp_path, "rl", 1, weights(1), state(1), keep=3)
    newest = save_checkpoint(tmp_path, "rl", 2, weights(2), state(2), keep=3)
    target = newest / "policy.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    path, skipped = latest_checkpoint(tmp_path)
    assert path.name == "000001-rl-000001"
    assert len(skipped) == 1 and str(newest) in skipped[0] and "using the previous one" in skipped[0]
    expected = {"truncate": "truncated", "flip": "sha256", "no_manifest": "no manifest", "delete": "missing"}[damage]
    assert expected in skipped[0]


def test_temporaries_are_never_checkpoints_and_are_removed(tmp_path):
    save_checkpoint(tmp_path, "rl", 1, weights(1), state(1))
    tmp = tmp_path / "checkpoints" / ".tmp-000002-rl-000002-99"
    tmp.mkdir()
    (tmp / "policy.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path)[0].name == "000001-rl-000001"
    remove_temporaries(tmp_path)
    assert not tmp.exists()


def test_global_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = global_rng_state()
    save_checkpoint(tmp_path, "rl", 1, {}, {"rng": saved})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_global_rng_state(load_checkpoint(latest_checkpoint(tmp_path)[0])[2]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
