"""In-process batched generation with a KV cache, returning per-token log-probabilities.

Prompts are left-padded; position ids count real tokens only, exactly as the training forward pass
(`posttrain.models.logprobs.response_logprobs`) does, so the log-probabilities agree. A row stops at
EOS; the loop stops when every row has stopped or `max_new_tokens` is reached.

The returned log-probability of a sampled token is log softmax(logits / temperature), i.e. the
temperature-scaled policy *before* top-k / top-p filtering, which is what the training forward pass
computes (the common convention of TRL, OpenRLHF and verl; filtering makes the sampling distribution
differ slightly from the one being optimised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from posttrain.batch import RolloutBatch
from posttrain.models.logprobs import positions_from_mask


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits with everything outside the top-k / nucleus set to -inf (0 and 1.0 switch them off)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
             pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, generator: torch.Generator | None = None) -> RolloutBatch:
    """Sample (or decode greedily) up to `max_new_tokens` tokens for each left-padded prompt (B, P)."""
    B = prompt_ids.size(0)
    attn = prompt_mask.long()
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=positions_from_mask(attn),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_pos = attn.sum(-1, keepdim=True)  # (B, 1): position of the first response token
    tokens, logps, masks = [], [], []
    alive = torch.ones(B, dtype=torch.bool)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        logits = logits / temperature
        if greedy:
            tok = logits.argmax(-1)
        else:
            probs = filter_logits(logits, top_k, top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        logp = F.log_softmax(logits, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        masks.append(alive.float())
        tokens.append(tok)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive = alive & (tok != eos_token_id)
        if not alive.any() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, masks[-1].long().unsqueeze(1)], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=attn, position_ids=next_pos + t,
                    past_key_values=cache, use_cache=True)
    response_mask = torch.stack(masks, 1)
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=torch.stack(tokens, 1),
                        response_mask=response_mask, logprobs=torch.stack(logps, 1), finished=~alive)
