"""Moved to :mod:`torchslim.capture.twin`."""

from torchslim._moved import moved_to
from torchslim.capture import twin

__getattr__ = moved_to(__name__, twin)
