"""Op rules: how channel positions flow through each torch op (see :mod:`.registry`)."""

from torchslim.ops import (
    decompositions,
    elementwise,
    experts,
    layers,
    recurrent,
    shape,
    tensor_math,
)
from torchslim.ops.registry import OpContext, callables, lookup, register_rule, rule_for

__all__ = [
    "OpContext",
    "callables",
    "decompositions",
    "elementwise",
    "experts",
    "layers",
    "lookup",
    "recurrent",
    "register_rule",
    "rule_for",
    "shape",
    "tensor_math",
]
