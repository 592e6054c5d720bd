"""Running the model on ``meta`` tensors: its structure without its weights.

Graphs are traced, and pruned models checked, with the model's own tensors swapped for
``meta`` ones (no memory, no compute) and ``meta`` copies of the example inputs; the real
tensors are back in place when the block ends, so pruning and importance scores work on the
real weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


@contextmanager
def swapped_to_meta(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself with its parameters, buffers and tensor attributes (weights that an
    old-style ``weight_norm`` hook computed, caches) swapped for ``meta`` tensors of the same
    shapes inside the block (shared tensors stay shared), and put back afterwards: a forward
    then costs no FLOPs, no memory and no copy of the module tree."""
    twins: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []

    def twin(tensor: torch.Tensor) -> torch.Tensor:
        found = twins.get(id(tensor))
        if found is None:
            found = torch.empty_like(tensor, device="meta")
            if isinstance(tensor, nn.Parameter):
                found = nn.Parameter(found, requires_grad=tensor.requires_grad)
            twins[id(tensor)] = found
        return found

    for module in model.modules():
        stores = (module._parameters, module._buffers, vars(module))
        for store in stores:
            for name, value in list(store.items()):
                if isinstance(value, torch.Tensor) and not value.is_meta:
                    swapped.append((store, name, value))
                    store[name] = twin(value)
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
