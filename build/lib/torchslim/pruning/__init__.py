"""Layer pruning functions (physically slicing parameters, keeping attributes consistent) and
the layer registry that says what each layer type is."""

from torchslim.pruning.functions import *  # noqa: F403
from torchslim.pruning.functions import __all__ as _FUNCTIONS
from torchslim.pruning.layers import (
    LayerKind,
    get_pruner,
    is_linear_like,
    layer_kind,
    register_layer,
    register_pruner,
)
from torchslim.pruning.roles import Role
from torchslim.pruning.tied import TiedParameters

__all__ = [
    *_FUNCTIONS,
    "LayerKind",
    "Role",
    "TiedParameters",
    "get_pruner",
    "is_linear_like",
    "layer_kind",
    "register_layer",
    "register_pruner",
]
