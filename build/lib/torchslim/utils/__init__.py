"""Utilities users reach as ``tp.utils``: MACs and parameter counting, pictures of a graph's
groups, and torch-pruning's small helpers."""

from torchslim.utils.drawing import draw_computational_graph, draw_dependency_graph, draw_groups
from torchslim.utils.helpers import (
    TORCH_BATCHNORM,
    TORCH_CONV,
    TORCH_LINEAR,
    TORCH_PRELU,
    count_params,
    flatten_as_list,
    print_tool,
)
from torchslim.utils.ops_counter import count_ops_and_params

__all__ = [
    "TORCH_BATCHNORM",
    "TORCH_CONV",
    "TORCH_LINEAR",
    "TORCH_PRELU",
    "count_ops_and_params",
    "count_params",
    "draw_computational_graph",
    "draw_dependency_graph",
    "draw_groups",
    "flatten_as_list",
    "print_tool",
]
