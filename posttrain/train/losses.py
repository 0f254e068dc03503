"""The supervised next-token loss on (prompt, completion) pairs: SFT's loss and PPO's ptx term."""

from __future__ import annotations

import torch

from posttrain.algos import aggregate
from posttrain.batch import right_pad
from posttrain.models.chat import encode_prompts, end_of_turn_id
from posttrain.models.logprobs import response_logprobs


def sft_loss(model, tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, int]:
    """Token-mean negative log-likelihood of `completions` (+ EOS) given `prompts`; and the token count."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    targets = [ids + [end_of_turn_id(tokenizer)]  # EOS, or a chat template's end-of-turn token
               for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    response_ids, response_mask = right_pad(targets, tokenizer.pad_token_id)
    device = next((p.device for p in model.parameters()), prompt_ids.device)
    prompt_ids, prompt_mask, response_ids, response_mask = (
        x.to(device) for x in (prompt_ids, prompt_mask, response_ids, response_mask))
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return aggregate(-logprobs, response_mask, "token-mean"), int(response_mask.sum())
