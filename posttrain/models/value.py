"""Scalar-head models: the reward model and the PPO critic, both HF `AutoModelForSequenceClassification`
with one label (a linear head on the last hidden state of a causal-LM backbone).

One head, two readings:

    token_values(model, ids, mask)      (B, L)  the head on every position's hidden state
    response_values(model, ...)         (B, T)  V(s_t) for each response token a_t: the head at the
                                                position just before a_t (as the policy's logits)
    last_token_scores(model, ids, mask) (B,)    the head at each row's last real token (the reward)

Sequences are left-padded with positions counted over real tokens, as in generation and
`posttrain.models.logprobs`, so a left-padded row's last token is always at position L-1.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from posttrain.errors import ModelLoadError
from posttrain.models.adapters import hf_module, plain_state_dict
from posttrain.models.logprobs import positions_from_mask, response_hidden_states


def _head(model: PreTrainedModel) -> torch.nn.Module:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ModelLoadError(f"{type(model).__name__} has no scalar head ('score' or 'classifier')")


def scalar_model_from_pretrained(path: str | Path, pad_token_id: int | None) -> PreTrainedModel:
    """A one-label sequence-classification model from a local HF directory.

    From a causal-LM checkpoint (e.g. the SFT model) the backbone weights load and the head starts at
    zero, so every score starts at 0; from a reward-model checkpoint everything loads.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = AutoConfig.from_pretrained(path)
    fresh_head = "ForSequenceClassification" not in "".join(config.architectures or [])
    config.num_labels = 1
    config.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is expected for the head
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot load a scalar-head model: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if fresh_head:
        torch.nn.init.zeros_(_head(model).weight)  # fresh head on a causal LM: start every score at 0
    return model


def build_scalar_model(cfg, tokenizer, seed: int = 0) -> PreTrainedModel:
    """The scalar-head model for a ModelConfig: `cfg.path` loaded (see `scalar_model_from_pretrained`),
    or, when None, a freshly initialised tiny Llama with a one-label head."""
    if cfg.path is not None:
        return scalar_model_from_pretrained(cfg.path, tokenizer.pad_token_id)
    from transformers import LlamaForSequenceClassification

    from posttrain.models.tiny import tiny_config

    config = tiny_config(cfg, tokenizer)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    torch.nn.init.zeros_(_head(model).weight)
    return model.float()


def token_values(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head on every position: (B, L) ids and mask -> (B, L) float32."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions_from_mask(attention_mask), use_cache=False)
    return _head(model)(hidden.last_hidden_state).squeeze(-1).float()


def last_token_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L) left-padded ids and mask -> (B,) the head's output at each row's last token."""
    return token_values(model, input_ids, attention_mask)[:, -1]


def response_values(model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """V(s_t) for every response token: prompt (B, P) left-padded, response (B, T) right-padded -> (B, T).

    s_t is the prompt plus a_0..a_{t-1}, so V(s_t) is read at the position of the token before a_t
    (the last prompt token for t = 0). Zero off the response mask.
    """
    hidden = response_hidden_states(model, prompt_ids, prompt_mask, response_ids, response_mask)  # lean forward
    if hidden is not None:
        return _head(model)(hidden).squeeze(-1).float() * response_mask
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    T = response_ids.size(1)
    values = token_values(model, input_ids, attn)[:, -T - 1:-1]
    return values * response_mask


def critic_from_policy(policy: PreTrainedModel) -> PreTrainedModel:
    """A scalar-head model with the policy's architecture and a copy of its backbone weights; the head
    starts at zero (every value 0). A LoRA policy gives its base weights (the critic trains fully)."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    prefix = hf_module(policy).base_model_prefix + "."
    model.base_model.load_state_dict({k.removeprefix(prefix): v for k, v in plain_state_dict(policy).items()
                                      if k.startswith(prefix)})
    torch.nn.init.zeros_(_head(model).weight)
    return model
