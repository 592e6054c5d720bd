"""torch-pruning's ``tp.function`` names: the layer pruning functions and their classes.

The same objects as :mod:`torchslim.pruning.functions`, under the peer's names, so scripts
that reach into ``tp.function`` run unchanged.
"""

from torchslim.pruning.functions import *  # noqa: F403
from torchslim.pruning.functions import (
    BasePruningFunc,
    BatchNormPruner,
    ConvPruner,
    EmbeddingPruner,
    GroupNormPruner,
    LayerNormPruner,
    LinearPruner,
    MultiheadAttentionPruner,
    ParameterPruner,
    PReLUPruner,
    RNNPruner,
    TransposedLinearPruner,
)
from torchslim.pruning.functions import __all__ as _FUNCTIONS

#: The peer's class names for the same pruners.
BatchnormPruner = BatchNormPruner
InstanceNormPruner = BatchNormPruner
LayernormPruner = LayerNormPruner
DepthwiseConvPruner = ConvPruner
LSTMPruner = RNNPruner

__all__ = [
    *_FUNCTIONS,
    "BasePruningFunc",
    "BatchNormPruner",
    "BatchnormPruner",
    "ConvPruner",
    "DepthwiseConvPruner",
    "EmbeddingPruner",
    "GroupNormPruner",
    "InstanceNormPruner",
    "LayerNormPruner",
    "LayernormPruner",
    "LSTMPruner",
    "LinearPruner",
    "MultiheadAttentionPruner",
    "PReLUPruner",
    "ParameterPruner",
    "RNNPruner",
    "TransposedLinearPruner",
]
