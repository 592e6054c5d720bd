"""Moved to :mod:`torchslim.spaces.analysis`."""

from torchslim._moved import moved_to
from torchslim.spaces import analysis

__getattr__ = moved_to(__name__, analysis)
