"""Pruners with sparse training: ``pruner.regularize(model)`` after ``loss.backward()`` pushes
the channels they will remove towards zero before pruning."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.importance import BNScaleImportance, GroupNormImportance, RandomImportance
from torchslim.importance.base import is_norm_layer
from torchslim.pruner.meta import MetaPruner


class MagnitudePruner(MetaPruner):
    """Magnitude-based pruning (the default importance is the L2 magnitude of the group)."""


BasePruner = MetaPruner


class RandomPruner(MetaPruner):
    """Random channels: a baseline for comparing criteria."""

    def __init__(self, model: nn.Module, example_inputs: Any, **kwargs: Any) -> None:
        kwargs.setdefault("importance", RandomImportance())
        super().__init__(model, example_inputs, **kwargs)


class BNScalePruner(MetaPruner):
    """Network slimming: L1 on BatchNorm scales during training, then prune the small ones.

    ``regularize`` adds ``reg * sign(gamma)`` to the BN scale gradients (and
    ``bias_reg * sign(beta)`` when set, as in the YOLOv8 recipe). Pass a new ``reg`` per epoch
    for a decaying strength (:func:`torchslim.pruner.decaying_l1`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        reg: float = 1e-5,
        bias_reg: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("importance", BNScaleImportance())
        super().__init__(model, example_inputs, **kwargs)
        self.reg = reg
        self.bias_reg = bias_reg
        self.update_regularizer()

    def update_regularizer(self) -> None:
        self._norms = list(
            dict.fromkeys(
                member.ref.module
                for group in self.groups()
                for member in group.coupling.members
                if is_norm_layer(member.ref.module) and member.ref.name == "weight"
            )
        )

    @torch.no_grad()
    def regularize(self, model: nn.Module, reg: Optional[float] = None) -> None:
        reg = self.reg if reg is None else reg
        for module in self._norms:
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.grad is not None:
                weight.grad.add_(reg * torch.sign(weight))
            bias = getattr(module, "bias", None)
            if self.bias_reg and isinstance(bias, nn.Parameter) and bias.grad is not None:
                bias.grad.add_(self.bias_reg * torch.sign(bias))


class GroupNormPruner(MetaPruner):
    """Group-level sparsity (DepGraph): a group lasso over every parameter of each channel.

    ``regularize`` adds ``reg * w / ||channel||_2`` to the gradient of every weight of a
    channel, where the norm runs over the whole coupled group, so whole groups shrink together.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, reg: float = 1e-4, **kwargs: Any
    ) -> None:
        kwargs.setdefault("importance", GroupNormImportance())
        super().__init__(model, example_inputs, **kwargs)
        self.reg = reg
        self.update_regularizer()

    def update_regularizer(self) -> None:
        self._groups_cache: list[Group] = self.groups()

    @torch.no_grad()
    def regularize(self, model: nn.Module, reg: Optional[float] = None) -> None:
        reg = self.reg if reg is None else reg
        channel_norm = GroupNormImportance(normalizer=None)
        for group in self._groups_cache:
            norms = channel_norm(group)
            if norms is None:
                continue
            for member, index in group.index_maps():
                param = getattr(member.ref.module, member.ref.name)
                if not channel_norm.accepts(group, member) or param.grad is None:
                    continue
                valid = torch.as_tensor(index >= 0)
                scale = torch.zeros(param.shape[member.dim], dtype=torch.float64)
                scale[valid] = reg / norms[torch.as_tensor(index)[valid]].clamp_min(1e-12)
                shape = [1] * param.dim()
                shape[member.dim] = -1
                param.grad.add_(param.detach() * scale.view(shape).to(param.dtype))
