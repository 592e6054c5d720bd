"""High-level pruners (``tp.pruner.MagnitudePruner(model, example_inputs, ...)``); the layer
pruning functions are here too under torch-pruning's names (``tp.pruner.prune_conv_out_channels``,
``tp.pruner.function``)."""

from torchslim import function
from torchslim.function import *  # noqa: F403
from torchslim.function import __all__ as _FUNCTIONS
from torchslim.pruner.blocks import BlockPruning, prune_blocks
from torchslim.pruner.meta import MetaPruner
from torchslim.pruner.reconstruct import Reconstruction, ReconstructionError, ReconstructionReport
from torchslim.pruner.schedule import decaying_l1, linear_scheduler
from torchslim.pruner.sparse import (
    BasePruner,
    BNScalePruner,
    GroupNormPruner,
    GrowingRegPruner,
    MagnitudePruner,
    RandomPruner,
)
from torchslim.pruner.summary import KindSummary, unmet_requests

__all__ = [
    *_FUNCTIONS,
    "function",
    "BNScalePruner",
    "BasePruner",
    "BlockPruning",
    "GroupNormPruner",
    "GrowingRegPruner",
    "KindSummary",
    "MagnitudePruner",
    "MetaPruner",
    "RandomPruner",
    "Reconstruction",
    "ReconstructionError",
    "ReconstructionReport",
    "decaying_l1",
    "linear_scheduler",
    "prune_blocks",
    "unmet_requests",
]
