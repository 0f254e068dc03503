"""A local Hugging Face causal LM as a generative judge: p(yes) for a yes/no question about each completion.

    rl.reward_funcs: ["posttrain.rewards.judge_local:hf_judge(model_path='models/smollm2-135m-instruct')"]

Each sample's question is the template filled in (the `{name}` placeholders of `http_judge`'s rubric:
`{prompt}`, `{completion}`, any data column), put through the tokenizer's chat template as one user message with
the assistant's turn opened (`add_generation_prompt=True`); a tokenizer without a chat template gets the question
followed by "\\nAnswer:" instead. One forward pass gives the next-token logits l, and the reward is

    score = sum_{t in Y} exp(l_t) / (sum_{t in Y} exp(l_t) + sum_{t in N} exp(l_t))
          = sigmoid(logsumexp(l_Y) - logsumexp(l_N))

that is p(yes) / (p(yes) + p(no)) for the next-token distribution p, with Y the token ids of the strings `yes`
(default "Yes", "yes", " Yes", " yes") and N those of `no` (default "No", "no", " No", " no"); a string the
tokenizer does not encode as exactly one token is left out. With one string each, the score is the two-token
softmax exp(l_yes) / (exp(l_yes) + exp(l_no)).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from posttrain.models.logprobs import causal_lm_logits
from posttrain.rewards.judge import (
    column_signature,
    fill_template,
    sample_fields,
    template_fields,
)

log = logging.getLogger(__name__)

DEFAULT_QUESTION = """Here is a request and a response to it.

Request:
{prompt}

Response:
{completion}

Is the response correct and helpful? Answer yes or no."""

YES = ("Yes", "yes", " Yes", " yes")
NO = ("No", "no", " No", " no")


class HFJudge:
    """A reward function scoring p(yes) with a local causal LM (see `hf_judge`). The model loads on the first call.

    Counters (attributes): `samples` scored, `too_long` (input longer than the model's context: None).
    """

    def __init__(self, model_path: str, question_template: str, device: str, dtype: str, batch_size: int,
                 yes: Sequence[str], no: Sequence[str], name: str):
        self.path = Path(model_path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"hf_judge: {model_path} is not a Hugging Face model directory (no config.json)")
        self.dtype = getattr(torch, dtype, None)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"hf_judge: dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"hf_judge: batch_size must be at least 1, got {batch_size}")
        self.template, self.device, self.batch_size = question_template, device, int(batch_size)
        self.yes_words, self.no_words = list(yes), list(no)
        self.columns = [f for f in template_fields(question_template) if f not in ("prompt", "completion")]
        self.__name__ = name
        self.__signature__ = column_signature(self.columns)
        self.model = self.tokenizer = None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []
        self.samples = self.too_long = 0

    def load(self):
        """(model, tokenizer), loaded from the directory on the first call (local files only)."""
        if self.model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.yes_ids, self.no_ids = _single_tokens(tokenizer, self.yes_words), _single_tokens(tokenizer,
                                                                                                 self.no_words)
            if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
                raise ValueError(f"hf_judge: the tokenizer in {self.path} needs one-token yes and no words, distinct; "
                                 f"got yes {self.yes_words} -> {self.yes_ids}, no {self.no_words} -> {self.no_ids}")
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, local_files_only=True)
            self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        return self.model, self.tokenizer

    def texts(self, prompts: list[str], completions: list[str], **columns) -> list[str]:
        """The judge model's input text for each sample (chat template applied)."""
        _, tokenizer = self.load()
        out = []
        for i in range(len(completions)):
            question = fill_template(self.template, sample_fields(prompts, completions, columns, self.columns, i))
            if tokenizer.chat_template:
                out.append(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                         add_generation_prompt=True))
            else:
                out.append(question + "\nAnswer:")
        return out

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        """p(yes) / (p(yes) + p(no)) per completion, in (0, 1); None for an input longer than the model's context."""
        model, tokenizer = self.load()
        texts = self.texts(prompts, completions, **columns)
        encoded = tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"]
        context = getattr(model.config, "max_position_embeddings", None) or float("inf")
        fits = [i for i, ids in enumerate(encoded) if len(ids) <= context]
        scores: list[float | None] = [None] * len(texts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for start in range(0, len(fits), self.batch_size):
            rows = fits[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, L), left-padded
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            with torch.no_grad():
                logits = causal_lm_logits(model, input_ids.to(self.device), mask.to(self.device), keep=1)
            logits = logits[:, -1].float()  # (b, V) next-token logits
            p_yes = torch.sigmoid(logits[:, self.yes_ids].logsumexp(-1) - logits[:, self.no_ids].logsumexp(-1))
            for i, p in zip(rows, p_yes.tolist()):
                scores[i] = p
        self.samples += len(texts)
        if len(fits) < len(texts):
            self.too_long += len(texts) - len(fits)
            log.warning("%s: %d of %d inputs are longer than the model's context of %d tokens; scored None",
                        self.__name__, len(texts) - len(fits), len(texts), context)
        return scores


def _single_tokens(tokenizer, words: Sequence[str]) -> list[int]:
    """The distinct token ids of the words that the tokenizer encodes as exactly one token."""
    ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    return list(dict.fromkeys(x[0] for x in ids if len(x) == 1))


def hf_judge(model_path: str, question_template: str = DEFAULT_QUESTION, device: str = "cpu",
             dtype: str = "float32", batch_size: int = 8, yes: Sequence[str] = YES, no: Sequence[str] = NO,
             name: str = "hf_judge") -> HFJudge:
    """A reward function scoring p(yes) / (p(yes) + p(no)) from a local causal LM; returns an `HFJudge`.

    model_path: a Hugging Face model directory (nothing is downloaded). question_template: the yes/no question,
    with `{prompt}`, `{completion}` and data columns by name (`{answer}`), which the reward then requires.
    device, dtype: where and in what precision the judge runs. batch_size: sequences per forward pass.
    yes, no: the answer words whose one-token encodings are summed (module docstring). name: the reward's name.
    """
    return HFJudge(model_path, question_template, device, dtype, batch_size, yes, no, name)
