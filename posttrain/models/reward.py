"""A reward model: a scalar-head model, its tokenizer, and the normalisation it applies when it scores.

    rm = RewardModel.load("runs/rm/final")
    scores = rm.score(prompts, completions, finished)   # (B,) (raw - mean) / std, no grad

Text in, scores out: the policy's completions are decoded and re-encoded with the reward model's own
tokenizer, so a reward model need not share the policy's vocabulary. A sequence is BOS + prompt +
completion, plus EOS when the completion finished (training pairs always end with EOS, like the
finished responses it will judge); longer sequences keep their last `max_length` tokens, where the
completion is. The normalisation statistics (`reward_mean`, `reward_std`, measured on a calibration set
after training) live in the model's config.json, so they travel with the weights.

With model.peft=lora (`with_adapter`), the backbone trains through LoRA adapters and the scalar head fully (peft's
modules_to_save); `save` writes the merged model, which `RewardModel.load` reads like any reward model, and the
adapter with its head in adapter/.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

from posttrain.batch import left_pad
from posttrain.config import ModelConfig
from posttrain.errors import ModelLoadError
from posttrain.models.adapters import apply_peft, hf_module, is_peft, save_merged
from posttrain.models.loading import architectures, check_model_dir
from posttrain.models.value import last_token_scores, scalar_model_from_pretrained

HEADS = ("score", "classifier")  # the scalar head's name in transformers' ForSequenceClassification models


def with_adapter(model, cfg: ModelConfig, seed: int = 0):
    """A scalar-head model with model.peft's LoRA adapters on its backbone and its head trained fully; itself
    when model.peft is null."""
    return apply_peft(model, cfg, seed, trained=tuple(n for n in HEADS if hasattr(model, n))[:1])


class RewardModel:
    def __init__(self, model, tokenizer, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        path = Path(path)
        check_model_dir(path, "reward model")
        arch = architectures(path)
        if not any("ForSequenceClassification" in a for a in arch):
            raise ModelLoadError(f"reward model: {path} holds a {', '.join(arch) or 'model with no architectures'}, "
                                 "not a reward model (a scalar-head ForSequenceClassification model); train one "
                                 "with posttrain rm")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"reward model: cannot load a tokenizer from {path}: {err}") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = scalar_model_from_pretrained(path, tokenizer.pad_token_id).eval().requires_grad_(False)
        return cls(model, tokenizer)

    @property
    def mean(self) -> float:
        return float(getattr(self.model.config, "reward_mean", 0.0))

    @property
    def std(self) -> float:
        return float(getattr(self.model.config, "reward_std", 1.0))

    def set_normalization(self, mean: float, std: float) -> None:
        """Store the calibration statistics in the model's config (saved with it)."""
        self.model.config.reward_mean = float(mean)
        self.model.config.reward_std = max(float(std), 1e-6)

    def scores(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) left-padded ids and mask -> (B,) raw scores (with grad when enabled; an adapted model's forward)."""
        return last_token_scores(hf_module(self.model), ids, mask)

    def encode(self, prompts: list[str], completions: list[str],
               finished: list[bool] | None = None) -> tuple[Tensor, Tensor]:
        """-> left-padded (ids, mask), each (B, L): BOS + prompt + completion (+ EOS when finished)."""
        finished = [True] * len(prompts) if finished is None else finished
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        seqs = []
        for row, done in zip(rows, finished, strict=True):
            row = row + [eos] if done and eos is not None else row
            seqs.append(row[-self.max_length:] if self.max_length else row)
        return left_pad(seqs, self.tokenizer.pad_token_id)

    def raw_scores(self, prompts: list[str], completions: list[str], finished: list[bool] | None = None,
                   batch_size: int = 256) -> Tensor:
        """(B,) scores before normalisation, computed in chunks of `batch_size`, no grad."""
        finished = [True] * len(prompts) if finished is None else list(finished)
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                ids, mask = self.encode(prompts[i:i + batch_size], completions[i:i + batch_size],
                                        finished[i:i + batch_size])
                out.append(self.scores(ids, mask))
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: list[str], completions: list[str], finished: list[bool] | None = None,
              batch_size: int = 256) -> Tensor:
        """(B,) normalised scores (raw - reward_mean) / reward_std."""
        return (self.raw_scores(prompts, completions, finished, batch_size) - self.mean) / self.std

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if is_peft(self.model):  # the merged model (normalisation in its config) and adapter/
            save_merged(self.model, out)
        else:
            self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out
