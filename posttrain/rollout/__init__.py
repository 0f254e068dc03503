"""Rollouts: in-process generation with a KV cache (vLLM on GPU is a later engine behind the same call)."""

from posttrain.rollout.generate import generate

__all__ = ["generate"]
