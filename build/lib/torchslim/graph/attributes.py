"""Moved to :mod:`torchslim.spaces.attributes`."""

from torchslim._moved import moved_to
from torchslim.spaces import attributes

__getattr__ = moved_to(__name__, attributes)
