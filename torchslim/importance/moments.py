"""Second moments of what a linear or convolution layer reads, for calibrated criteria and
reconstruction.

A layer is seen as ``y = W x`` per *feature*: an input channel of a linear layer (``nn.Linear``,
transformers' ``Conv1D``), or one channel at one kernel offset of a 1-d or 2-d convolution
(im2col), per group of a grouped convolution. :class:`InputMoments` accumulates ``sum x x^T`` and
``sum x`` over calibration inputs in float64; :func:`weight_rows` gives the weight as
``[groups, outputs per group, features]`` to match.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from torchslim.pruning.layers import is_linear_like, layer_kind


def unsupported(module: nn.Module) -> Optional[str]:
    """Why the input moments of ``module`` cannot be taken (``None`` if they can)."""
    if not layer_kind(module).contracts:
        return f"{type(module).__name__} is not a linear or convolution layer"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed convolutions are not supported"
        if module.weight.dim() not in (3, 4):
            return f"{type(module).__name__}: only 1-d and 2-d convolutions (im2col)"
    return None


def kernel_size(module: nn.Module) -> int:
    """Features per input channel: the kernel's number of offsets (1 for linear layers)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return math.prod(module.weight.shape[2:])
    return 1


def input_channels(module: nn.Module) -> int:
    """Input channels the weight holds (per group for a grouped convolution)."""
    weight = module.weight
    return weight.shape[0] if is_linear_like(module) else weight.shape[1]


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as ``[groups, outputs per group, features]`` in float64."""
    return weight_row_view(module).double()


def weight_row_view(module: nn.Module) -> torch.Tensor:
    """The weight as ``[groups, outputs per group, features]`` in its own dtype (a view where
    the layout allows: a block of rows can be cast alone)."""
    weight = module.weight.detach()
    weight = weight.T if is_linear_like(module) else weight
    groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    features = input_channels(module) * kernel_size(module)
    return weight.reshape(weight.shape[0], -1).reshape(groups, -1, features)


def write_weight_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Set the weight from ``[groups, outputs per group, features]`` (a new parameter)."""
    old = module.weight
    new = rows.reshape(-1, rows.shape[-1])
    if is_linear_like(module):
        new = new.T
    new = new.reshape(old.shape).to(old.dtype).contiguous()
    module.weight = nn.Parameter(new, requires_grad=old.requires_grad)


class InputMoments:
    """``sum x x^T`` (``[groups, features, features]``), ``sum x`` and the number of positions
    of one layer's inputs, accumulated in float64 by :meth:`observe` (a forward pre-hook)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.is_conv = isinstance(module, nn.modules.conv._ConvNd)
        self.groups = module.groups if self.is_conv else 1
        self.features = input_channels(module) * kernel_size(module)
        self.gram: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def nbytes(self) -> int:
        return self.groups * (self.features**2 + self.features) * 8

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """``[positions, groups, features]`` of one input batch."""
        if not self.is_conv:
            return x.reshape(-1, 1, x.shape[-1])
        module = self.module
        if x.dim() == module.weight.dim() - 1:
            x = x.unsqueeze(0)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if module.weight.dim() == 3:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
        padding = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = nn.functional.pad(x, padding, mode=mode) if any(padding) else x
        cols = nn.functional.unfold(x, kernel, dilation=dilation, stride=stride)
        cols = cols.view(cols.shape[0], self.groups, self.features, -1)
        return cols.permute(0, 3, 1, 2).reshape(-1, self.groups, self.features)

    def observe(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is None or x.device.type == "meta":
            return
        if not x.is_floating_point():
            raise ValueError(
                f"{self.name} received a {x.dtype} input during calibration; it needs floating "
                "point activations (are the batches the model's inputs?)"
            )
        features = self.features_of(x.detach()).double()
        if features.shape[-1] != self.features:
            return
        gram = torch.einsum("ngi,ngj->gij", features, features)
        total = features.sum(0)
        if self.gram is None:
            self.gram, self.total = gram, total
        else:
            self.gram += gram
            self.total += total
        self.count += features.shape[0]

    def subset(self, channels: list[int]) -> InputMoments:
        """The moments of the features of these input channels only (one group)."""
        if self.groups != 1:
            raise ValueError(f"{self.name}: subsets of grouped convolution moments")
        per_channel = kernel_size(self.module)
        features = torch.tensor(
            [c * per_channel + k for c in channels for k in range(per_channel)], dtype=torch.long
        )
        out = InputMoments(self.module, self.name)
        out.features = len(features)
        out.gram = self.gram[:, features][:, :, features]
        out.total = self.total[:, features]
        out.count = self.count
        return out

    def second(self) -> torch.Tensor:
        """``E[x x^T]`` per group."""
        return self.gram / self.count

    def mean(self) -> torch.Tensor:
        return self.total / self.count
