"""Moved to :mod:`torchslim.cli.datasets`."""

from torchslim._moved import moved_to
from torchslim.cli import datasets

__getattr__ = moved_to(__name__, datasets)
