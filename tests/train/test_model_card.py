"""final/README.md (posttrain/train/model_card.py): Hugging Face front matter that parses, the method, data,
held-out results, the full config and the command; written into final/ by a tiny `posttrain sft` run."""

import json
import re

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import dump_config
from posttrain.train.model_card import METHODS, model_card


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def config_block(card: str) -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)\n```", card, re.S).group(1))


def test_the_card_of_an_rl_run(tmp_path, make_config):
    cfg = make_config(tmp_path, "model.path=runs/sft/final", "rl.preset=grpo")
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"hf_dataset": "openai/gsm8k"})})
    summary = {"initial_accuracy": 0.25, "rl_accuracy": 0.5, "eval_problems": 20, "wall_seconds": 3.2,
               "dropped_prompts": {"training": 0, "held-out": 1}, "seed": 0}
    card = model_card(cfg, "rl", summary, "posttrain rl configs/grpo.yaml rl.steps=2",
                      {"training problems": 400, "held-out problems": 20})
    assert front_matter(card) == {"library_name": "transformers", "base_model": "runs/sft/final",
                                  "tags": ["posttrain", "rl", "grpo"], "datasets": ["openai/gsm8k"],
                                  "pipeline_tag": "text-generation"}
    for heading in ("# Online RL with posttrain", "## Method", "## Data", "## Held-out results", "## Config",
                    "## Command"):
        assert f"\n{heading}\n" in card
    assert "| `rl.preset` | grpo |" in card and "| `rl.group_size` | 4 |" in card
    assert "- task: `arithmetic`" in card and "- training problems: 400" in card and "- held-out problems: 20" in card
    assert "| initial_accuracy | 0.25 |" in card and "| rl_accuracy | 0.5 |" in card
    assert "| dropped_prompts.held-out | 1 |" in card and "wall_seconds" not in card
    assert config_block(card) == cfg.model_dump(mode="json")
    assert "<details>" in card and "```\nposttrain rl configs/grpo.yaml rl.steps=2\n```" in card


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_card_without_a_command_or_a_base_model(tmp_path, make_config, method):
    card = model_card(make_config(tmp_path), method, {"eval_accuracy": 0.75, "examples": ["1+1=2"]})
    meta = front_matter(card)
    assert meta["tags"][:2] == ["posttrain", method] and "base_model" not in meta and "datasets" not in meta
    assert "randomly initialised tiny model" in card and "Not recorded" in card
    assert "| eval_accuracy | 0.75 |" in card and "1+1=2" not in card


def test_posttrain_sft_writes_final_readme(tmp_path, make_config):
    dump_config(make_config(tmp_path / "run", "sft.eval_every=0"), tmp_path / "tiny.yaml")
    assert main(["sft", str(tmp_path / "tiny.yaml"), "sft.steps=2"]) == 0
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert front_matter(card)["tags"] == ["posttrain", "sft"]
    assert f"| sft_accuracy | {summary['sft_accuracy']:.6g} |" in card
    assert f"```\nposttrain sft {tmp_path / 'tiny.yaml'} sft.steps=2\n```" in card  # the command line, as typed
    assert config_block(card)["sft"]["steps"] == 2
