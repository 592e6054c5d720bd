"""High-level pruners (``tp.pruner.MagnitudePruner(model, example_inputs, ...)``)."""

from torchslim.pruner.meta import MetaPruner
from torchslim.pruner.reconstruct import Reconstruction, ReconstructionError, ReconstructionReport
from torchslim.pruner.schedule import decaying_l1, linear_scheduler
from torchslim.pruner.sparse import (
    BasePruner,
    BNScalePruner,
    GroupNormPruner,
    MagnitudePruner,
    RandomPruner,
)

__all__ = [
    "BNScalePruner",
    "BasePruner",
    "GroupNormPruner",
    "MagnitudePruner",
    "MetaPruner",
    "RandomPruner",
    "Reconstruction",
    "ReconstructionError",
    "ReconstructionReport",
    "decaying_l1",
    "linear_scheduler",
]
