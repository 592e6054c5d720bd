"""Optimal Brain Damage with the diagonal Fisher of per-sample weight gradients (torch-pruning's
``OBDCImportance``).

An output channel's score is ``sum_j w_j^2 F_jj`` over its weights, ``F_jj`` the mean over
calibration steps of the squared per-sample gradients of weight ``j`` (each sample's gradient of
a batch-mean loss, scaled back by the batch size). Per-sample gradients of linear and
2-d convolution layers come from their inputs and output gradients (:class:`ComputeMatGrad`).

As in torch-pruning::

    imp = tp.importance.OBDCImportance(num_classes=10)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, ...)
    imp._prepare_model(model, pruner)
    for images, labels in loader:
        model.zero_grad()
        loss_fn(model(images), labels).backward()
        imp.step()
    pruner.step()
    imp._rm_hooks(model)
    imp._clear_buffer()

``with imp.record(model):`` works too (call :meth:`step` after each backward there as well).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.importance.criteria import _Recorder
from torchslim.importance.registry import register_importance
from torchslim.pruning.roles import Role
from torchslim.spaces.analysis import ParamDim


class ComputeMatGrad:
    """Per-sample gradients of a layer's weight: ``[batch, outputs, inputs]`` (a 2-d
    convolution's inputs unfolded as ``in_channels x kh x kw``; a bias adds a last column),
    from the layer's input and the gradient of its output."""

    def __call__(
        self, input: torch.Tensor, grad_output: torch.Tensor, layer: nn.Module
    ) -> torch.Tensor:
        if isinstance(layer, nn.Linear):
            return self.linear(input, grad_output, layer)
        if isinstance(layer, nn.Conv2d):
            return self.conv2d(input, grad_output, layer)
        raise NotImplementedError(f"per-sample gradients of {type(layer).__name__}")

    @staticmethod
    def linear(input: torch.Tensor, grad_output: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        x = input.reshape(input.shape[0], -1, input.shape[-1])
        g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
        if layer.bias is not None:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
        return torch.einsum("bto,bti->boi", g, x)

    @staticmethod
    def conv2d(input: torch.Tensor, grad_output: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
        if layer.groups != 1 or isinstance(layer.padding, str):
            raise NotImplementedError("per-sample gradients of grouped or 'same'-padded convs")
        x = F.unfold(input, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        g = grad_output.flatten(2)
        if layer.bias is not None:
            x = torch.cat([x, x.new_ones(x.shape[0], 1, x.shape[2])], 1)
        return torch.einsum("bol,bil->boi", g, x)


@register_importance("obdc")
class OBDCImportance(_Recorder):
    """OBD scores from per-sample weight gradients (see the module docstring). Layers of
    ``target_types`` (linear and ungrouped 2-d convolutions) are recorded; a linear layer with
    ``num_classes`` outputs (the classifier) is not scored, as in torch-pruning."""

    #: Recorded with a loss and its backward pass (the CLI does that on labelled images).
    needs_loss = True

    def __init__(
        self,
        group_reduction: str = "mean",
        normalizer: Any = "mean",
        bias: bool = False,
        target_types: Iterable[type] = (nn.modules.conv._ConvNd, nn.Linear),
        num_classes: int = 100,
    ) -> None:
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, bias=bias)
        self.target_types = tuple(target_types)
        self.num_classes = num_classes
        self.MatGradHandler = ComputeMatGrad()
        self.Fisher: dict[int, torch.Tensor] = {}
        self.steps = 0
        self._pending: dict[int, torch.Tensor] = {}
        self._recording: Optional[Any] = None

    def wants(self, module: nn.Module) -> bool:
        if not isinstance(module, self.target_types):
            return False
        return isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and not isinstance(module.padding, str)
        )

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_hook(self._observe)

    def _observe(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = inputs[0].detach()
        key = id(module)

        def on_gradient(grad: torch.Tensor) -> None:
            per_sample = self.MatGradHandler(x.double(), grad.detach().double(), module)
            square = (per_sample * grad.shape[0]).pow(2).sum(0)
            pending = self._pending.get(key)
            self._pending[key] = square if pending is None else pending + square

        output.register_hook(on_gradient)

    def step(self) -> None:
        """Add the squared per-sample gradients of the last backward pass to the Fisher."""
        for key, square in self._pending.items():
            known = self.Fisher.get(key)
            fits = known is not None and known.shape == square.shape
            self.Fisher[key] = known + square if fits else square
        self._pending.clear()
        self.steps += 1

    def _prepare_model(self, model: nn.Module, pruner: Any = None) -> None:
        """Start recording (torch-pruning's name); :meth:`_rm_hooks` stops it."""
        self._recording = self.record(model)
        self._recording.__enter__()

    def _rm_hooks(self, model: Optional[nn.Module] = None) -> None:
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = None

    def _clear_buffer(self) -> None:
        self.Fisher.clear()
        self._pending.clear()
        self.steps = 0

    def adjust_fisher(self, group: Group, idxs: Any) -> None:
        """torch-pruning's pruner calls this before pruning; here the pruning history tells
        which recorded rows and columns remain, so nothing needs adjusting."""

    def accepts(self, group: Group, member: ParamDim) -> bool:
        module = member.ref.module
        if id(module) not in self.Fisher or group.handler_role(member) != Role.OUT:
            return False
        if isinstance(module, nn.Linear) and module.out_features == self.num_classes:
            return False
        return member.ref.name == "weight" or (member.ref.name == "bias" and self.bias)

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        module = member.ref.module
        fisher = self.Fisher[id(module)] / max(self.steps, 1)
        weight = module.weight.detach().double().flatten(1)
        per_channel = weight.shape[1] // module.weight.shape[1]
        columns = fisher.shape[1] - (module.bias is not None)
        recorded_inputs = torch.arange(columns // per_channel)
        rows = self.current(member, Role.OUT, torch.arange(fisher.shape[0]), weight.shape[0])
        inputs = self.current(member, Role.IN, recorded_inputs, module.weight.shape[1])
        if rows is None or inputs is None:
            return None
        fisher = fisher[rows]
        if member.ref.name == "bias":
            return tensor.detach().double().pow(2) * fisher[:, -1]
        kept = inputs[:, None] * per_channel + torch.arange(per_channel)
        return (weight.pow(2) * fisher[:, kept.reshape(-1)]).sum(1)
