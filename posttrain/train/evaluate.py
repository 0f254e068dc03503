"""Held-out evaluation: the task's reward of greedy completions."""

from __future__ import annotations

import torch

from posttrain.models.chat import decode_responses, encode_prompts, stop_token_ids
from posttrain.rollout import generate


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], batch_size: int,
                       max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Greedy completions of `prompts` and whether each ended with EOS."""
    was_training = model.training
    model.eval()
    completions, finished = [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size])
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, greedy=True)
        completions += decode_responses(tokenizer, out.response_ids, out.response_mask)
        finished += out.finished.tolist()
    model.train(was_training)
    return completions, finished


def evaluate_per_problem(model, tokenizer, task, problems, batch_size: int, max_new_tokens: int) -> list[float]:
    """The task's reward of the greedy completion of every problem."""
    prompts = [p.prompt for p in problems]
    completions, _ = greedy_completions(model, tokenizer, prompts, batch_size, max_new_tokens)
    return [float(r) for r in task.reward(prompts, completions, problems)]


def evaluate(model, tokenizer, task, problems, batch_size: int, max_new_tokens: int) -> float:
    """Held-out exact-match accuracy with greedy decoding."""
    scores = evaluate_per_problem(model, tokenizer, task, problems, batch_size, max_new_tokens)
    return sum(scores) / len(problems)
