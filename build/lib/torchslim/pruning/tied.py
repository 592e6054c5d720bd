"""Parameters shared by several modules stay shared through pruning."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.pruning.layers import get_pruner


class TiedParameters:
    """Parameters shared by several modules (tied input and output embeddings).

    Pruning replaces a parameter on the module it is pruned through; :meth:`retie` then gives
    every other owner the same new tensor (and lets their pruning functions update attributes
    such as ``in_features``), so the weights stay tied."""

    def __init__(self, model: nn.Module) -> None:
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), []).append((module, name))
                tensors[id(param)] = param
        self.groups = [(tensors[k], v) for k, v in owners.items() if len(v) > 1]

    def retie(self) -> None:
        for k, (tensor, owners) in enumerate(self.groups):
            current = [getattr(module, name) for module, name in owners]
            replaced = next((t for t in current if t is not tensor), None)
            if replaced is None:
                continue
            for module, name in owners:
                if getattr(module, name) is not replaced:
                    setattr(module, name, replaced)
                    pruner = get_pruner(module)
                    if pruner is not None:
                        pruner.sync(module)
            self.groups[k] = (replaced, owners)
