"""Exact resume for every training command besides sft/rl (tests/recipes/test_resume.py): `posttrain rm`, `dpo`,
`rft` and the RLHF pipeline (`demo --pipeline rlhf`: SFT -> reward model -> PPO -> ablation). A run that
crashes after its k-th metrics line and resumes from its newest checkpoint ends with the same weights, the
same metrics files (timings aside) and the same summary as an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import build_config
from posttrain.train.metrics import MetricsLogger
from posttrain.api import RECIPES
from posttrain.train.control import RunDiverged, find_resume_point
from posttrain.recipes.pipeline import rlhf_config, run_rlhf
from tests.conftest import tiny_run_dict
from tests.recipes.test_pipeline import tiny_rlhf

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)

TIMING = ("time/", "tokens_per_s")


class Crash(Exception):
    pass


@pytest.fixture
def crash_after(monkeypatch):
    """`crash_after(k)`: the k-th metrics line written from now on (any file) raises Crash after it is written."""
    def arm(k: int | None):
        count = {"n": 0}
        original = MetricsLogger.log

        def log(self, record):
            original(self, record)
            count["n"] += 1
            if k is not None and count["n"] == k:
                raise Crash

        monkeypatch.setattr(MetricsLogger, "log", log)
        return count

    return arm


def lines(path):
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(TIMING)} for x in path.read_text().splitlines()]


def outputs(run) -> dict:
    """Everything a run leaves that must not depend on an interruption."""
    got = {}
    for f in sorted(run.rglob("*")):
        rel = str(f.relative_to(run))
        if f.name == "metrics.jsonl":
            got[rel] = lines(f)
        elif f.suffix == ".safetensors":
            got[rel] = load_file(str(f))
        elif f.name == "summary.json":
            got[rel] = {k: v for k, v in json.loads(f.read_text()).items() if "seconds" not in k}
    return got


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and all(isinstance(v, torch.Tensor) for v in a[key].values()):
            assert a[key].keys() == b[key].keys(), key
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"{key}: {name}"
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny model after a few SFT steps (`posttrain sft`), so that its samples end with EOS and some are right:
    the starting model of the runs below."""
    out = tmp_path_factory.mktemp("resume_sft") / "sft"
    recipe_function("sft")(build_config(tiny_run_dict(out), ["sft.steps=30", "sft.lr=1e-2", "sft.log_every=30"]))
    return str(out / "final")


def tiny(tmp_path, name, *overrides):
    d = tiny_run_dict(tmp_path / name)
    d["checkpoint"] = {"every": 2, "keep": 2}
    return build_config(d, list(overrides))


RM = ["rm.steps=5", "rm.num_pairs=24", "rm.batch_size=8", "rm.eval_every=2", "rm.log_every=1", "rm.calibration_size=8"]
DPO = ["dpo.steps=5", "dpo.num_pairs=24", "dpo.batch_size=8", "dpo.eval_every=2", "dpo.log_every=1"]
RFT = ["rft.rounds=2", "rft.steps=3", "rft.prompts_per_round=12", "rft.samples=4", "rft.max_new_tokens=4",
       "rft.batch_size=4", "rft.log_every=1", "rft.min_score=null"]


@pytest.mark.parametrize("recipe,overrides,crashes", [
    ("rm", RM, [3, 5]),
    ("dpo", DPO, [4, 6]),
    ("rft", RFT, [4, 6, 8, 9]),  # inside round 1, at round 2's start, inside round 2, after its last step
], ids=["rm", "dpo", "rft"])
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, crash_after, sft_model, recipe, overrides, crashes):
    run = recipe_function(recipe)
    overrides = [*overrides, f"model.path={sft_model}"]
    full_cfg = tiny(tmp_path, "full", *overrides)
    count = crash_after(None)
    run(full_cfg)
    total = count["n"]
    expected = outputs(tmp_path / "full")
    assert crashes[-1] <= total
    for k in crashes:
        cfg = tiny(tmp_path, f"crash{k}", *overrides)
        crash_after(k)
        with pytest.raises(Crash):
            run(cfg)
        assert find_resume_point(tmp_path / f"crash{k}") is not None
        crash_after(None)
        run(cfg, resume=True)
        assert not (tmp_path / f"crash{k}" / "checkpoints").exists()
        assert_same(outputs(tmp_path / f"crash{k}"), expected)


def test_rlhf_pipeline_resumes_in_every_stage(tmp_path, crash_after):
    """One crash inside each stage (SFT, reward model, PPO, ablation), each resumed: same results."""
    def config(name):
        d = tiny_rlhf(tmp_path)
        d["output_dir"] = str(tmp_path / name)
        d["checkpoint"] = {"every": 1, "keep": 2}
        return rlhf_config(d, ["rl.steps=3", "rl.eval_every=2", "rm.log_every=1", "rm.eval_every=2"])

    count = crash_after(None)
    run_rlhf(*config("full"))
    expected = outputs(tmp_path / "full")
    phases = [r["phase"] for r in lines(tmp_path / "full" / "metrics.jsonl")]
    n_main = len(phases)
    n_ppo = len(lines(tmp_path / "full" / "ppo" / "metrics.jsonl"))
    assert count["n"] == n_main + n_ppo + len(lines(tmp_path / "full" / "ablation" / "metrics.jsonl"))
    crash_points = {"sft": phases.index("rm") - 1, "rm": n_main - 1, "rl": n_main + 2, "ablation": n_main + n_ppo + 2}
    for stage, k in crash_points.items():
        crash_after(k)
        with pytest.raises(Crash):
            run_rlhf(*config(stage))
        assert find_resume_point(tmp_path / stage).phase == stage
        crash_after(None)
        cfg, ablation = config(stage)
        run_rlhf(cfg, ablation, resume=True)
        assert not (tmp_path / stage / "checkpoints").exists()
        assert_same(outputs(tmp_path / stage), expected)


@pytest.mark.parametrize("recipe,overrides", [
    ("rm", [*RM, "rm.lr=1e30"]),
    ("dpo", [*DPO, "dpo.lr=1e30"]),
    ("rft", [*RFT, "rft.lr=1e30", "rft.steps=8"]),
], ids=["rm", "dpo", "rft"])
def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_state_saved(tmp_path, sft_model, recipe, overrides):
    cfg = tiny(tmp_path, "run", *overrides, f"model.path={sft_model}", "checkpoint.max_skipped_steps=3",
               "checkpoint.every=0")
    with pytest.raises(RunDiverged, match="3 consecutive steps with a non-finite loss"):
        recipe_function(recipe)(cfg)
    run = tmp_path / "run"
    skipped = [r for r in lines(run / "metrics.jsonl") if r.get("skipped")]
    assert len(skipped) == 3
    resume_point = find_resume_point(run)
    assert resume_point.phase == recipe and resume_point.step == skipped[-1]["step"]
    key = "reward_model" if recipe == "rm" else "policy"
    assert all(torch.isfinite(t).all() for t in resume_point.weights[key].values())  # no NaN step was applied


def test_summary_counts_prompts_dropped_for_the_context(tmp_path):
    """Prompts too long for the context are dropped before the run; summary.json says how many per split."""
    cfg = tiny(tmp_path, "run", "model.max_position_embeddings=10", "sft.steps=1")  # BOS "12+13=" + 4 new > 10
    summary = recipe_function("sft")(cfg)
    dropped = summary["dropped_prompts"]
    assert dropped["training"] > 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["dropped_prompts"] == dropped


def recipe_function(command: str):
    """The function `posttrain COMMAND` runs."""
    import importlib

    module, name = RECIPES[command]
    return getattr(importlib.import_module(module), name)
