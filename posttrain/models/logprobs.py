"""The training forward pass: per-token log-probabilities (and entropy) of a response given its prompt.

Generation (`posttrain.rollout.generate`) lays tokens out the same way (left-padded prompt, response
after it, positions counted over real tokens only), so for the same tokens both give the same
log-probabilities and the first on-policy PPO ratio is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.models.lean import lean_backbone, positions_from_mask


def causal_lm_logits(model, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
    """(B, L) left-padded ids and mask -> (B, keep, V) logits of the last `keep` positions, positions counted
    over real tokens (the HF forward; `response_logprobs` takes the lean one where it can)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                 logits_to_keep=keep, use_cache=False).logits


def response_hidden_states(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                           response_mask: Tensor) -> Tensor | None:
    """(B, T, C) final hidden states that predict each response token, through the lean forward
    (posttrain.models.lean: Llama, Qwen2; shared prompts run once), or None where it does not apply."""
    lean = lean_backbone(model)
    if lean is None:
        return None
    return lean.response_hidden(prompt_ids, prompt_mask, response_ids, response_mask)


def response_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) for every response token, and optionally the entropy of pi(. | s_t).

    prompt_ids, prompt_mask: (B, P) left-padded. response_ids, response_mask: (B, T) right-padded.
    Returns logprobs (B, T) (0 off the mask) and entropy (B, T) or None. Logits are divided by
    `temperature`, as in sampling.
    """
    lean = lean_backbone(model)
    if lean is not None and lean.head is not None:
        logits = lean.logits(lean.response_hidden(prompt_ids, prompt_mask, response_ids, response_mask))
    else:
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
        attn = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
        logits = causal_lm_logits(model, input_ids, attn, keep=response_ids.size(1) + 1)[:, :-1]
    logits = logits.float() / temperature  # (B, T, V): the logits at s_t predict a_t
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * response_mask
    return logprobs, entropy
