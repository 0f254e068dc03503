"""A model of the wrong kind is refused before any training (issue 16, item 3): a reward model or critic given
as the policy, a causal LM given as the reward model, a run directory given as a model directory."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.config import ModelConfig
from posttrain.errors import ModelLoadError
from posttrain.models import build_char_tokenizer, build_tiny_model, load_policy, save_pretrained
from posttrain.models.reward import RewardModel
from posttrain.models.value import build_scalar_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tokenizer = build_char_tokenizer()
    root = tmp_path_factory.mktemp("kinds")
    policy = save_pretrained(build_tiny_model(ModelConfig(), tokenizer), tokenizer, root / "run" / "final")
    rm = save_pretrained(build_scalar_model(ModelConfig(), tokenizer), tokenizer, root / "rm")
    headless = save_pretrained(build_tiny_model(ModelConfig(), tokenizer), tokenizer, root / "headless")
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    return {"policy": policy, "run": root / "run", "rm": rm, "headless": headless}


def test_a_reward_model_is_not_a_policy(dirs):
    with pytest.raises(ModelLoadError, match=r"holds a LlamaForSequenceClassification \(a reward model or critic\)"):
        load_policy(ModelConfig(path=str(dirs["rm"])))


def test_a_causal_lm_without_its_head_weights_is_refused(dirs):
    with pytest.raises(ModelLoadError, match=r"lacks 1 weights a causal LM needs \(lm_head.weight\)"):
        load_policy(ModelConfig(path=str(dirs["headless"])))


def test_a_policy_is_not_a_reward_model(dirs):
    with pytest.raises(ModelLoadError, match=r"holds a LlamaForCausalLM, not a reward model"):
        RewardModel.load(dirs["policy"])
    assert RewardModel.load(dirs["rm"]).model.config.architectures == ["LlamaForSequenceClassification"]


def test_a_run_directory_gets_a_hint_at_its_final_model(dirs):
    final = dirs["run"] / "final"
    with pytest.raises(ModelLoadError, match=f"did you mean {final}"):
        load_policy(ModelConfig(path=str(dirs["run"])))
    with pytest.raises(ModelLoadError, match=f"did you mean {final}"):
        RewardModel.load(dirs["run"])
    model, _ = load_policy(ModelConfig(path=str(final)))
    assert torch.equal(model.lm_head.weight, load_file(final / "model.safetensors")["lm_head.weight"])
