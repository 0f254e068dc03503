"""Held-out evaluation: the task's reward of greedy completions."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Evaluation:
    """Greedy completions of held-out problems and the task's reward of each."""

    prompts: list[str]
    completions: list[str]
    scores: list[float]

    @property
    def accuracy(self) -> float:
        """Mean reward (for a 0/1 verifier: the share solved)."""
        return sum(self.scores) / len(self.scores)

    def samples(self, n: int) -> list[dict]:
        """The first `n` as rows {prompt, response, reward}: what a tracker shows as a table."""
        return [{"prompt": p, "response": c, "reward": r}
                for p, c, r in zip(self.prompts[:n], self.completions[:n], self.scores[:n])]


def evaluate_problems(model, tokenizer, task, problems, batch_size: int, max_new_tokens: int) -> Evaluation:
    """The task's reward of the greedy completion of every problem."""
    prompts = [p.prompt for p in problems]
    completions, _ = greedy_completions(model, tokenizer, prompts, batch_size, max_new_tokens)
    scores = [float(r) for r in task.reward(prompts, completions, problems)]
    return Evaluation(prompts, completions, scores)


def evaluate(model, tokenizer, task, problems, batch_size: int, max_new_tokens: int) -> float:
    """Held-out accuracy (mean reward) with greedy decoding."""
    return evaluate_problems(model, tokenizer, task, problems, batch_size, max_new_tokens).accuracy
