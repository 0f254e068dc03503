"""The bases every config section builds on (frozen, unknown keys refused, defaults validated), the fields
several sections share (the optimizer's, the cosine schedule's, sampling's), and `_suggest`, the near
miss that a validator's error names."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class _AdamW(_Section):
    """The optimizer fields every training section shares (its lr and warm-up are its own)."""

    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")


class _CosineDecay(_Section):
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")


class _Sampling(_Section):
    """The sampling fields every section that samples completions shares."""

    temperature: float = Field(1.0, gt=0, description="Sampling temperature (RL: the log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
