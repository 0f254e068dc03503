"""The training forward pass: per-token log-probabilities (and entropy) of a response given its prompt.

Generation (`posttrain.rollout.generate`) lays tokens out the same way (left-padded prompt, response
after it, positions counted over real tokens only), so for the same tokens both give the same
log-probabilities and the first on-policy PPO ratio is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def positions_from_mask(mask: Tensor) -> Tensor:
    """(B, L) attention mask -> (B, L) position ids counting real tokens only (0 on left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) for every response token, and optionally the entropy of pi(. | s_t).

    prompt_ids, prompt_mask: (B, P) left-padded. response_ids, response_mask: (B, T) right-padded.
    Returns logprobs (B, T) (0 off the mask) and entropy (B, T) or None. Logits are divided by
    `temperature`, as in sampling.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attn = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    T = response_ids.size(1)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions_from_mask(attn),
                logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # (B, T, V): the logits at s_t predict a_t
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * response_mask
    return logprobs, entropy
