"""Routed-experts layers run another way inside a block: as one traced op, or eagerly."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import nn

from torchslim.ops.experts import is_routed_experts, routed_experts


@contextmanager
def _forwards_replaced(model: nn.Module, forward_of: Callable[[nn.Module], Any]) -> Iterator[None]:
    """Each routed-experts layer of ``model`` runs ``forward_of(layer)`` (unless that is
    ``None``) as its forward inside the block."""
    replaced = []
    for layer in model.modules():
        forward = forward_of(layer) if is_routed_experts(layer) else None
        if forward is not None and "forward" not in vars(layer):
            vars(layer)["forward"] = forward
            replaced.append(layer)
    try:
        yield
    finally:
        for layer in replaced:
            vars(layer).pop("forward", None)


def experts_as_ops(model: nn.Module) -> Any:
    """Inside the block, each routed-experts layer of ``model`` runs as one call of
    :func:`~torchslim.ops.experts.routed_experts` (its own forward, seen as one op)."""
    return _forwards_replaced(model, lambda layer: functools.partial(routed_experts, layer))


def eager_experts(model: nn.Module) -> Any:
    """Inside the block, routed-experts layers run their plain PyTorch forward (a loop over the
    experts hit) instead of fused kernels, which lack float64 on CPU (the exactness check)."""

    def eager(layer: nn.Module) -> Any:
        plain = getattr(type(layer).forward, "__wrapped__", None)
        return functools.partial(plain, layer) if plain is not None else None

    return _forwards_replaced(model, eager)
