"""Routed-experts layers run another way inside a block: as one traced op, or eagerly."""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from torchslim.capture.modules import forwards_replaced
from torchslim.ops.experts import is_routed_experts, routed_experts


def _experts_replaced(model: nn.Module, forward_of: Callable[[nn.Module], Any]) -> Any:
    """Each routed-experts layer of ``model`` without a forward of its own instance runs
    ``forward_of(layer)`` (unless that is ``None``) as its forward inside the block."""
    replacements = {}
    for layer in model.modules():
        if is_routed_experts(layer) and "forward" not in vars(layer):
            forward = forward_of(layer)
            if forward is not None:
                replacements[layer] = forward
    return forwards_replaced(replacements)


def experts_as_ops(model: nn.Module) -> Any:
    """Inside the block, each routed-experts layer of ``model`` runs as one call of
    :func:`~torchslim.ops.experts.routed_experts` (its own forward, seen as one op)."""
    return _experts_replaced(model, lambda layer: functools.partial(routed_experts, layer))


def eager_experts(model: nn.Module) -> Any:
    """Inside the block, routed-experts layers run their plain PyTorch forward (a loop over the
    experts hit) instead of fused kernels, which lack float64 on CPU (the exactness check)."""

    def eager(layer: nn.Module) -> Any:
        plain = getattr(type(layer).forward, "__wrapped__", None)
        return functools.partial(plain, layer) if plain is not None else None

    return _experts_replaced(model, eager)
