"""Utilities users reach as ``tp.utils``: MACs and parameter counting."""

from torchslim.utils.ops_counter import count_ops_and_params

__all__ = ["count_ops_and_params"]
