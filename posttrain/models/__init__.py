"""Models: the tiny Llama built from a config, the character tokenizer, and loading any local HF causal LM."""

from posttrain.models.loading import load_policy, save_pretrained
from posttrain.models.tiny import build_tiny_model
from posttrain.models.tokenizer import build_char_tokenizer

__all__ = ["build_char_tokenizer", "build_tiny_model", "load_policy", "save_pretrained"]
