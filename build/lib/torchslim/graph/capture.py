"""Moved: the trace's data record to :mod:`torchslim.spaces.trace`, the recorder and module
helpers to :mod:`torchslim.capture`."""

from torchslim._moved import moved_to
from torchslim.capture import modules, recorder
from torchslim.spaces import trace

__getattr__ = moved_to(__name__, trace, modules, recorder)
