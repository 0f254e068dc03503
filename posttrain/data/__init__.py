"""Data loading: preference pairs for reward models and DPO. Light imports only (`datasets` loads lazily)."""

from .preferences import PreferencePair, load_preference_pairs, split_hh, split_pairs

__all__ = ["PreferencePair", "load_preference_pairs", "split_hh", "split_pairs"]
