"""Scalar-head models: the reward model and the critic read the head where the docs say."""

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.errors import ModelLoadError
from posttrain.models import save_pretrained
from posttrain.models.logprobs import positions_from_mask
from posttrain.models.reward import RewardModel
from posttrain.models.value import (_head, build_scalar_model, critic_from_policy, last_token_scores,
                                    response_values, scalar_model_from_pretrained, token_values)
from tests.conftest import TINY_MODEL


def randomize_head(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _head(model).weight.copy_(torch.randn(_head(model).weight.shape, generator=g))


def test_from_a_causal_lm_the_backbone_loads_and_the_head_starts_at_zero(tmp_path, tiny_model, tokenizer):
    save_pretrained(tiny_model, tokenizer, tmp_path / "sft")
    rm = scalar_model_from_pretrained(tmp_path / "sft", tokenizer.pad_token_id)
    for name, p in tiny_model.model.named_parameters():
        assert torch.equal(p, dict(rm.model.named_parameters())[name]), name
    assert torch.count_nonzero(_head(rm).weight) == 0
    critic = critic_from_policy(tiny_model)
    assert all(torch.equal(p, dict(critic.model.named_parameters())[n]) for n, p in tiny_model.model.named_parameters())
    assert torch.count_nonzero(_head(critic).weight) == 0


def test_last_token_score_equals_the_hf_pooled_output(tokenizer):
    model = build_scalar_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0)
    randomize_head(model)
    rm = RewardModel(model, tokenizer)
    ids, mask = rm.encode(["1+2=", "13+14="], ["3", "27"])
    ours = last_token_scores(model, ids, mask)
    hf = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.squeeze(-1)
    torch.testing.assert_close(ours, hf)
    assert ids[0, -1] == tokenizer.eos_token_id and mask[0, 0] == 0  # EOS appended, left padding


def test_response_values_read_the_position_before_each_token(tokenizer):
    model = build_scalar_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0)
    randomize_head(model)
    prompt_ids = torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    response_ids = torch.tensor([[10, 11, 2], [12, 2, 0]])
    response_mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    values = response_values(model, prompt_ids, prompt_mask, response_ids, response_mask)
    full = token_values(model, torch.cat([prompt_ids, response_ids], 1),
                        torch.cat([prompt_mask, response_mask.long()], 1))
    assert values.shape == (2, 3)
    torch.testing.assert_close(values[0], full[0, 3:6])  # V(s_0) at the last prompt token
    torch.testing.assert_close(values[1, :2], full[1, 3:5])
    assert values[1, 2] == 0  # off the mask


def test_normalisation_is_saved_with_the_model_and_applied(tmp_path, tokenizer):
    model = build_scalar_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0)
    randomize_head(model)
    rm = RewardModel(model, tokenizer)
    raw = rm.raw_scores(["1+2=", "3+4="], ["3", "7"])
    rm.set_normalization(mean=0.5, std=2.0)
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert (loaded.mean, loaded.std) == (0.5, 2.0)
    torch.testing.assert_close(loaded.score(["1+2=", "3+4="], ["3", "7"]), (raw - 0.5) / 2.0)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_truncated_responses_are_scored_without_eos_and_long_ones_keep_their_end(tokenizer):
    model = build_scalar_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0)
    rm = RewardModel(model, tokenizer, max_length=5)
    ids, mask = rm.encode(["123456789+1="], ["10"], finished=[False])
    assert ids.shape == (1, 5) and tokenizer.decode(ids[0]) == "+1=10"


def test_missing_reward_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        RewardModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        RewardModel.load(tmp_path / "empty")
