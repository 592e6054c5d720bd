"""Pruners with sparse training: ``pruner.regularize(model)`` after ``loss.backward()`` pushes
the channels they will remove towards zero before pruning."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.importance import BNScaleImportance, GroupNormImportance, RandomImportance
from torchslim.importance.base import is_norm_layer
from torchslim.pruner.meta import MetaPruner
from torchslim.spaces.analysis import ParamDim


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
            if norms is not None:
                accepts = partial(channel_norm.accepts, group)
                _decay(group, reg / norms.clamp_min(1e-12), accepts)


class GrowingRegPruner(MetaPruner):
    """Growing regularisation (Wang et al., ICLR 2021): an L2 penalty per channel that grows
    fastest on the channels that matter least, so they fade out before they are pruned.

    Every channel of every group starts at ``reg``; :meth:`update_reg` (call it every few
    iterations) adds ``delta_reg`` times the channel's standardised unimportance (1 for the
    group's least important channel, 0 for its most important) under ``importance``;
    :meth:`regularize` adds ``gamma * w`` to the gradient of every coupled weight of a channel
    (biases too with ``bias=True``)."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        reg: float = 1e-5,
        delta_reg: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, example_inputs, **kwargs)
        self.base_reg = reg
        self.delta_reg = delta_reg
        self.update_regularizer()

    def update_regularizer(self) -> None:
        """Start every channel of the current groups at ``reg`` (after a pruning step)."""
        self._groups_cache: list[Group] = self.groups()
        self.group_reg = {
            group.coupling.id: torch.full((group.size,), float(self.base_reg), dtype=torch.float64)
            for group in self._groups_cache
        }

    @torch.no_grad()
    def update_reg(self) -> None:
        for group in self._groups_cache:
            scores = self.importance(group)
            if scores is None or not len(scores):
                continue
            scores = scores.double()
            spread = scores.max() - scores.min()
            unimportance = (scores.max() - scores) / (spread + 1e-12)
            self.group_reg[group.coupling.id] += self.delta_reg * unimportance

    @torch.no_grad()
    def regularize(self, model: nn.Module, bias: bool = False) -> None:
        for group in self._groups_cache:

            def accepts(member: ParamDim, group: Group = group) -> bool:
                wanted = member.ref.name != "bias" or bias
                return (
                    wanted and not member.ref.is_buffer and group.handler_role(member) is not None
                )

            _decay(group, self.group_reg[group.coupling.id], accepts)


def _decay(group: Group, per_channel: torch.Tensor, accepts: Callable[[ParamDim], bool]) -> None:
    """Add ``per_channel[i] * w`` to the gradient of every weight of channel ``i`` in the
    coupled parameters ``accepts`` takes (weight decay, one strength per channel)."""
    for member, index in group.index_maps():
        param = getattr(member.ref.module, member.ref.name)
        if not accepts(member) or not isinstance(param, nn.Parameter) or param.grad is None:
            continue
        valid = torch.as_tensor(index >= 0)
        scale = torch.zeros(param.shape[member.dim], dtype=torch.float64)
        scale[valid] = per_channel[torch.as_tensor(index)[valid]].double()
        shape = [1] * param.dim()
        shape[member.dim] = -1
        param.grad.add_(param.detach() * scale.view(shape).to(param.dtype))
