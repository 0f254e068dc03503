"""Every shipped SmolLM2 config (configs/*_smollm2.yaml, configs/grpo_ifeval.yaml with each RL preset) runs
through the CLI as a user runs it, with the 98 MB model replaced by a tiny random Llama that has SmolLM2's
tokenizer and chat template (`stand_in`), the runs shortened, and the data files the configs name under
../shared/data replaced by the samples in tests/data/samples. The real runs' numbers: docs/real-model.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("if_verifiable")

from posttrain.cli import main  # noqa: E402
from posttrain.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "tests" / "data" / "samples"
# The shipped configs read ../shared/data (beside the checkout, not in it); the tests point them at the samples.
DATA_PATHS = {
    "sft_gsm8k_smollm2": ("task.path", "gsm8k/train.jsonl"),
    "rm_hh_smollm2": ("rm.data", "hh-rlhf/harmless-base/test.jsonl.gz"),
    "dpo_hh_smollm2": ("dpo.data", "hh-rlhf/harmless-base/test.jsonl.gz"),
}
FAST = ["threads=1", "progress=false", "model.dtype=float32"]
SHORT = {
    "sft_gsm8k_smollm2": ["task.num_eval=4", "sft.steps=2", "sft.batch_size=2", "eval.max_new_tokens=8",
                          "eval.batch_size=4"],
    "rm_hh_smollm2": ["rm.limit=40", "rm.steps=2", "rm.batch_size=2", "rm.calibration_size=4"],
    "dpo_hh_smollm2": ["dpo.limit=40", "dpo.steps=2", "dpo.batch_size=2"],
    "bon_ifeval_smollm2": ["task.num_eval=8", "bon.n=2", "bon.num_prompts=4", "bon.max_new_tokens=8"],
    "rft_ifeval_smollm2": ["task.num_eval=4", "rft.prompts_per_round=8", "rft.samples=2", "rft.max_new_tokens=8",
                           "rft.steps=2", "rft.batch_size=2", "rft.min_score=null", "eval.max_new_tokens=8"],
    "grpo_tools_smollm2": ["task.num_eval=4", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
                           "rl.micro_batch_size=4", "rl.max_new_tokens=8", "eval.max_new_tokens=8"],
}


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(SHORT))
def test_each_recipe_config_runs_on_a_smollm2_shaped_model(name, stand_in, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' relative paths are from the repository root
    command = {"grpo": "rl"}.get(name.split("_")[0], name.split("_")[0])
    assert shipped(name)["model"]["path"] == "models/smollm2-135m-instruct"
    data = []
    if name in DATA_PATHS:
        key, relative = DATA_PATHS[name]
        section, field = key.split(".")
        assert shipped(name)[section][field] == f"../shared/data/{relative}"  # the override replaces this path
        data = [f"{key}={SAMPLES / relative}"]
    out = tmp_path / name
    config = ["--config", f"configs/{name}.yaml"] if command == "bon" else [f"configs/{name}.yaml"]
    rc = main([command, *config, f"model.path={stand_in}", f"output_dir={out}", *FAST, *SHORT[name], *data])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 0
    if command != "bon":
        assert (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_rl_preset_runs_from_the_real_model_config(preset, stand_in, tmp_path):
    out = tmp_path / preset
    rc = main(["rl", str(REPO / "configs" / "grpo_ifeval.yaml"), f"model.path={stand_in}", f"output_dir={out}",
               f"rl.preset={preset}", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=8",
               "rl.mini_batches=1", "rl.micro_batch_size=4", "rl.warmup_steps=0", "task.num_eval=4",
               "eval.max_new_tokens=8", *FAST])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_problems"] == 4
