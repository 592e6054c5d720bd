"""Moved to :mod:`torchslim.graph.record`."""

from torchslim._moved import moved_to
from torchslim.graph import record

__getattr__ = moved_to(__name__, record)
