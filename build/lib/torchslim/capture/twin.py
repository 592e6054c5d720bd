"""Running the model on ``meta`` tensors: its structure without its weights.

Graphs are traced, and pruned models checked, with the model's own tensors swapped for
``meta`` ones (no memory, no compute) and ``meta`` copies of the example inputs; the real
tensors are back in place when the block ends, so pruning and importance scores work on the
real weights.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn


class MetaTwins:
    """``meta`` twins of tensors, kept between swaps: a tensor still alive with the layout it
    had (shape, strides, dtype, gradient flag) gets the twin it had, if a forward did not
    reshape that twin (a check after each pruning step swaps the same unchanged weights
    again). Copies and pickles start empty."""

    def __init__(self) -> None:
        self._found: dict[int, tuple[weakref.ref, tuple[Any, ...], torch.Tensor]] = {}

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        key, layout = id(tensor), _layout(tensor)
        entry = self._found.get(key)
        if entry is not None:
            ref, had, twin = entry
            if ref() is tensor and had == layout and twin.shape == tensor.shape:
                return twin
        twin = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        self._found[key] = (weakref.ref(tensor, functools.partial(self._forget, key)), layout, twin)
        return twin

    def __len__(self) -> int:
        """The number of live tensors with a twin."""
        return len(self._found)

    def __getstate__(self) -> dict[str, Any]:
        return {"_found": {}}

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._found.get(key)
        if entry is not None and entry[0] is ref:
            del self._found[key]


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    strides = tensor.stride() if tensor.layout == torch.strided else tensor.layout
    return (tensor.shape, strides, tensor.dtype, tensor.requires_grad, type(tensor))


@contextmanager
def swapped_to_meta(model: nn.Module, twins: Optional[MetaTwins] = None) -> Iterator[nn.Module]:
    """``model`` itself with its parameters, buffers and tensor attributes (weights that an
    old-style ``weight_norm`` hook computed, caches) swapped for ``meta`` tensors of the same
    shapes inside the block (shared tensors stay shared), and put back afterwards: a forward
    then costs no FLOPs, no memory and no copy of the module tree. ``twins`` keeps the meta
    tensors for the next swap."""
    twins = MetaTwins() if twins is None else twins
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for module in model.modules():
        stores = (module._parameters, module._buffers, vars(module))
        for store in stores:
            for name, value in list(store.items()):
                if isinstance(value, torch.Tensor) and not value.is_meta:
                    swapped.append((store, name, value))
                    store[name] = twins.of(value)
    try:
        yield model
    finally:
        for store, name, value in reversed(swapped):
            store[name] = value


def to_meta(obj: Any) -> Any:
    """The same nested inputs with every tensor on ``meta``."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, dict):
        return type(obj)({key: to_meta(value) for key, value in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_meta(value) for value in obj)
    return obj
