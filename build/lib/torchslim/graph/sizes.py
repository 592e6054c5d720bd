"""Moved to :mod:`torchslim.spaces.sizes`."""

from torchslim._moved import moved_to
from torchslim.spaces import sizes

__getattr__ = moved_to(__name__, sizes)
