"""Same seed and config, same numbers: two in-process demo runs agree bit for bit; another seed does not."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.recipes.demo import run_demo

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)

VOLATILE = ("time/", "tokens_per_s")  # wall-clock measurements


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_config):
    root = tmp_path_factory.mktemp("determinism")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = make_config(root / name, f"seed={seed}")
        out[name] = (root / name, run_demo(cfg))
    return out


def weights(run_dir, sub="final"):
    return load_file(str(run_dir / sub / "model.safetensors"))


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in lines]


def test_same_seed_gives_identical_summaries_metrics_and_weights(runs):
    (dir_a, sum_a), (dir_b, sum_b) = runs["a"], runs["b"]
    for key in ("sft_accuracy", "rl_accuracy", "eval_problems", "seed", "parameters"):
        assert sum_a[key] == sum_b[key], key
    assert metrics(dir_a) == metrics(dir_b)
    for sub in ("sft", "final"):
        wa, wb = weights(dir_a, sub), weights(dir_b, sub)
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert different == [], sub


def test_different_seed_gives_different_weights(runs):
    (dir_a, sum_a), (dir_c, sum_c) = runs["a"], runs["c"]
    assert sum_c["seed"] == 1 and sum_a["seed"] == 0
    wa, wc = weights(dir_a), weights(dir_c)
    assert all(not torch.equal(wa[k], wc[k]) for k in wa if "norm" not in k)
