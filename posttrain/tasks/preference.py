"""The built-in preference task: arithmetic problems, pairs of completions, and a hidden gold rule.

    prefs = ArithmeticPreferenceTask(task)            # task: an ArithmeticTask
    train, held_out = prefs.train_eval_pairs(num_pairs, policy, tokenizer, seed)

The gold rule is the arithmetic task's verifiable reward: the correct result written as the bare number
is preferred to anything else (so "95" beats the carry-dropping "85" and the format slip "95.").
Preference learners (DPO and family, reward models) never see the rule, only pairs it labelled; the
task's held-out accuracy under greedy decoding then measures whether learning from the pairs helped.

Pairs are built as `posttrain.recipes.reward_model.synthetic_pairs` builds them for the reward model:
for each problem the candidates are the policy's own sampled completions (those that ended with EOS),
the correct answer, plausible wrong answers (`wrong_answers`) and the answer with a full stop; the chosen
side is a gold-preferred candidate and the rejected side one of the policy's own mistakes when it made
any (after SFT on the drop-carry demonstrations, usually the answer without the carry), else a
constructed wrong answer. Comparisons among the model's own samples are what InstructGPT's labellers saw
and what DPO learns most from (on-policy pairs).
"""

from __future__ import annotations

import random

import torch

from posttrain.data import PreferencePair
from posttrain.models.chat import decode_responses, encode_prompts, stop_token_ids
from posttrain.rollout import generate
from posttrain.tasks.arithmetic import wrong_answers


class ArithmeticPreferenceTask:
    """Preference pairs over an `ArithmeticTask`, labelled by its hidden gold rule (exact match)."""

    name = "arithmetic_preferences"

    def __init__(self, task):
        self.task = task

    @property
    def eval_problems(self) -> list:
        return self.task.eval_problems

    def gold(self, problem, completion: str) -> float:
        """The hidden rule's score of one completion (1.0: the bare correct number)."""
        return float(self.task.reward([problem.prompt], [completion], [problem])[0])

    def prefers(self, problem, a: str, b: str) -> bool:
        """True when the gold rule strictly prefers completion `a` to `b`."""
        return self.gold(problem, a) > self.gold(problem, b)

    def pairs(self, problems: list, policy, tokenizer, seed: int, samples: int = 4) -> list[PreferencePair]:
        """One gold-labelled pair per problem (problems whose candidates all tie are skipped)."""
        from posttrain.tasks.preference import synthetic_pairs  # noqa: PLC0415 (recipes import tasks)

        return synthetic_pairs(self.task, policy, tokenizer, problems, seed, samples=samples)

    def train_eval_pairs(self, num_pairs: int, policy, tokenizer, seed: int,
                         samples: int = 4) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """`num_pairs` training pairs on training problems drawn with replacement, and one held-out pair per
        held-out problem (disjoint from the training problems)."""
        rng = random.Random(f"preference-problems-{seed}")
        train_problems = [rng.choice(self.task.train_problems) for _ in range(num_pairs)]
        train = self.pairs(train_problems, policy, tokenizer, seed, samples)
        return train, self.pairs(self.task.eval_problems, policy, tokenizer, seed + 1, samples)


@torch.no_grad()
def synthetic_pairs(task, policy, tokenizer, problems, seed: int, samples: int = 4,
                    batch_size: int = 512) -> list[PreferencePair]:
    """One gold-labelled pair per problem from the policy's samples and plausible wrong answers."""
    rng = random.Random(f"rm-pairs-{seed}")
    gen = torch.Generator().manual_seed(seed)
    was_training = policy.training
    policy.eval()
    pairs = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [p.prompt for p in chunk for _ in range(samples)]
        ids, mask = encode_prompts(tokenizer, prompts)
        out = generate(policy, ids, mask, max_new_tokens=8, eos_token_id=stop_token_ids(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, generator=gen)
        sampled = decode_responses(tokenizer, out.response_ids, out.response_mask)
        for j, p in enumerate(chunk):
            own = [s for s, done in zip(sampled[j * samples:(j + 1) * samples],
                                        out.finished[j * samples:(j + 1) * samples].tolist(), strict=True) if done]
            candidates = list(dict.fromkeys([p.answer, *own, *wrong_answers(p, rng), p.answer + "."]))
            gold = task.reward([p.prompt] * len(candidates), candidates, [p] * len(candidates))
            good = [c for c, g in zip(candidates, gold, strict=True) if g == max(gold)]
            bad = [c for c, g in zip(candidates, gold, strict=True) if g < max(gold)]
            if not bad:
                continue
            own_bad = [c for c in bad if c in own]
            rejected = rng.choice(own_bad or bad)
            pairs.append(PreferencePair(p.prompt, rng.choice(good), rejected))
    policy.train(was_training)
    return pairs
