"""Moved to :mod:`torchslim.spaces.symbolic`."""

from torchslim._moved import moved_to
from torchslim.spaces import symbolic

__getattr__ = moved_to(__name__, symbolic)
