"""torchslim: structural and unstructured pruning for PyTorch, on an exact dependency graph.

``import torchslim as tp`` gives the familiar API: ``tp.DependencyGraph``, ``tp.prune_*``
functions, ``tp.strategy``, ``tp.utils.count_ops_and_params`` and ``tp.verify``.
"""

from torchslim import (
    function,
    graph,
    hf,
    importance,
    ops,
    pruner,
    pruning,
    sparsity,
    strategy,
    utils,
)
from torchslim import search as search
from torchslim.graph.dependency import Dependency, DependencyGraph, Group, GroupItem, Node
from torchslim.ops import register_rule, rule_for
from torchslim.persistence import (
    CheckpointError,
    apply_plan,
    load,
    load_pruned,
    load_state_dict,
    save,
    save_pruned,
    state_dict,
)
from torchslim.pruner import (
    BasePruner,
    BNScalePruner,
    GroupNormPruner,
    GrowingRegPruner,
    MagnitudePruner,
    MetaPruner,
    RandomPruner,
    prune_blocks,
)
from torchslim.pruning import *  # noqa: F403
from torchslim.pruning import BasePruningFunc, register_pruner
from torchslim.sparsity import GMPUnstructuredPruner, UnstructuredPruner
from torchslim.verify import VerifyReport, random_selections, verify

__version__ = "0.1.0"

__all__ = [
    "GMPUnstructuredPruner",
    "UnstructuredPruner",
    "sparsity",
    "CheckpointError",
    "apply_plan",
    "load",
    "load_pruned",
    "load_state_dict",
    "save",
    "state_dict",
    "save_pruned",
    "prune_blocks",
    "BasePruner",
    "BasePruningFunc",
    "BNScalePruner",
    "GroupNormPruner",
    "GrowingRegPruner",
    "MagnitudePruner",
    "MetaPruner",
    "RandomPruner",
    "function",
    "Dependency",
    "DependencyGraph",
    "Group",
    "GroupItem",
    "Node",
    "VerifyReport",
    "graph",
    "hf",
    "importance",
    "ops",
    "pruner",
    "pruning",
    "random_selections",
    "register_pruner",
    "register_rule",
    "rule_for",
    "search",
    "strategy",
    "utils",
    "verify",
]
