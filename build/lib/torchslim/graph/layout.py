"""Moved to :mod:`torchslim.spaces.layout`."""

from torchslim._moved import moved_to
from torchslim.spaces import layout

__getattr__ = moved_to(__name__, layout)
