"""Prune hooks: functions called with the model each time pruning has changed it.

``register_prune_hook(hook)`` works like torch's global module hooks: the hook runs after
every pruning step of every graph (after a pruner's step, a standalone ``Group.prune``, or
loading a plan with :func:`torchslim.load_pruned`), and the returned handle's ``remove()``
unregisters it. :mod:`torchslim.hf` registers one that keeps a Hugging Face config true to
the pruned weights.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

PruneHook = Callable[[nn.Module], None]
_HOOKS: OrderedDict[int, PruneHook] = OrderedDict()


def register_prune_hook(hook: PruneHook) -> RemovableHandle:
    """Call ``hook(model)`` after each pruning step; ``handle.remove()`` stops it."""
    handle = RemovableHandle(_HOOKS)
    _HOOKS[handle.id] = hook
    return handle


def run_prune_hooks(model: nn.Module) -> None:
    """Tell every registered hook that ``model`` was pruned."""
    for hook in list(_HOOKS.values()):
        hook(model)
