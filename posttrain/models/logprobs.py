"""The training forward pass: per-token log-probabilities (and entropy) of a response given its prompt.

Generation (`posttrain.rollout.generate`) lays tokens out the same way (left-padded prompt, response
after it, positions counted over real tokens only), so for the same tokens both give the same
log-probabilities and the first on-policy PPO ratio is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.models.adapters import hf_module
from posttrain.models.lean import lean_backbone, positions_from_mask
from posttrain.models.packed import linear, training_reorder


def causal_lm_logits(model, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
    """(B, L) left-padded ids and mask -> (B, keep, V) logits of the last `keep` positions, positions counted
    over real tokens (the HF forward; `response_logprobs` takes the lean one where it can)."""
    return hf_module(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask), logits_to_keep=keep, use_cache=False).logits


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
        hidden = lean.response_hidden(prompt_ids, prompt_mask, response_ids, response_mask)  # (B, T, C)
        return chunked_logprobs(hidden, lean.head.weight, lean.head.bias, response_ids, response_mask, temperature,
                                with_entropy)
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


CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB of float32, e.g. 170 tokens of a 49,152-token vocabulary


def _token_logprobs(hidden: Tensor, actions: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                    with_entropy: bool, reordered: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(N, C) hidden, (N,) actions -> (N,) log pi(a | s) and (N,) entropy (zeros when not asked for). `reordered`:
    the head as packed.training_reorder gives it (the same values), or None."""
    logits = linear(hidden, weight, bias, reordered).float()  # (N, V)
    logp_all = F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # x / 1 == x exactly
    logprobs = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else logprobs.new_zeros(())
    return logprobs, entropy


def chunked_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, actions: Tensor, mask: Tensor,
                     temperature: float = 1.0, with_entropy: bool = False,
                     chunk_elements: int = CHUNK_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) = log_softmax(W h_t + b)[a_t] / temperature-scaled, and the entropy of pi(. | s_t), for
    the positions in `mask` only, without a (B, T, V) tensor.

    hidden (B, T, C) final hidden states predicting `actions` (B, T); weight (V, C), bias (V,) or None; mask
    (B, T). Returns (B, T) log-probs and entropy (or None), 0 off the mask. The masked positions are taken in
    chunks of chunk_elements // V tokens; with autograd on and more than one chunk, each chunk's logits are
    recomputed in the backward pass (activation checkpointing), so at most one chunk's (n, V) logits exist at a
    time, forward or backward. Same values and gradients as the plain full-vocabulary computation."""
    B, T, C = hidden.shape
    where = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the positions used
    h = hidden.reshape(B * T, C).index_select(0, where)
    a = actions.reshape(B * T).index_select(0, where)
    n = max(1, chunk_elements // weight.size(0))
    recompute = torch.is_grad_enabled() and len(where) > n
    reordered = training_reorder(weight) if len(where) > n else None  # one snapshot of the head for every chunk
    lps, ents = [], []
    for s in range(0, len(where), n):
        args = (h[s:s + n], a[s:s + n], weight, bias, temperature, with_entropy, reordered)
        lp, ent = checkpoint(_token_logprobs, *args, use_reentrant=False) if recompute else _token_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    logprobs = _scatter(lps, where, B, T, hidden)
    return logprobs, _scatter(ents, where, B, T, hidden) if with_entropy else None


def _scatter(parts: list[Tensor], where: Tensor, B: int, T: int, like: Tensor) -> Tensor:
    """The chunks' (n,) values placed at their flat positions of a (B, T) float32 tensor of zeros."""
    values = torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)
    return like.new_zeros(B * T, dtype=torch.float32).index_put((where,), values).view(B, T)
