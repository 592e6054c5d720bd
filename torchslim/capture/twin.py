"""Tracing on a ``meta`` twin: the model's structure without its weights.

An LLM's graph is built from a copy of its module tree whose parameters and buffers are
``meta`` tensors (no memory, no compute), run on ``meta`` copies of the example inputs. The
graph is then *rebound* to the real model, by module path, so pruning and importance scores
work on the real weights.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from torchslim.spaces.analysis import Analysis
from torchslim.spaces.attributes import AttributeSlot
from torchslim.spaces.trace import TensorRef


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters, buffers and tensor attributes (weights that
    an old-style ``weight_norm`` hook computed, caches) live on ``meta``."""
    memo: dict[int, Any] = {}
    attributes = (
        value
        for module in model.modules()
        for value in vars(module).values()
        if isinstance(value, torch.Tensor)
    )
    for tensor in itertools.chain(model.parameters(), model.buffers(), attributes):
        twin = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = twin
    return copy.deepcopy(model, memo)


def to_meta(obj: Any) -> Any:
    """The same nested inputs with every tensor on ``meta``."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, dict):
        return type(obj)({key: to_meta(value) for key, value in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_meta(value) for value in obj)
    return obj


def rebind(analysis: Analysis, slots: list[AttributeSlot], model: nn.Module) -> None:
    """Point every parameter reference and attribute slot of a twin's graph at ``model``."""
    refs: dict[tuple[str, str], TensorRef] = {}
    for member in analysis.param_dims:
        key = (member.ref.module_name, member.ref.name)
        if key not in refs:
            owner = model.get_submodule(member.ref.module_name)
            refs[key] = TensorRef(
                member.ref.module_name, owner, member.ref.name, member.ref.is_buffer
            )
        member.ref = refs[key]
    for slot in slots:
        slot.module = model.get_submodule(slot.module_name)
