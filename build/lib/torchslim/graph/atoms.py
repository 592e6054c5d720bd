"""Moved to :mod:`torchslim.spaces.atoms`."""

from torchslim._moved import moved_to
from torchslim.spaces import atoms

__getattr__ = moved_to(__name__, atoms)
