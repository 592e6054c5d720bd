"""Small helpers under torch-pruning's ``tp.utils`` names."""

from __future__ import annotations

import difflib
from typing import Any, Optional

import torch
from torch import nn

from torchslim.spaces.trace import iter_tensors

#: Layer base classes by torch-pruning's names.
TORCH_CONV = nn.modules.conv._ConvNd
TORCH_LINEAR = nn.Linear
TORCH_BATCHNORM = nn.modules.batchnorm._BatchNorm
TORCH_PRELU = nn.PReLU


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared ones once)."""
    return sum(p.numel() for p in module.parameters())


def flatten_as_list(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclass outputs, in order."""
    return list(iter_tensors(obj))


class print_tool:  # noqa: N801 (torch-pruning's name)
    """Show what pruning changed in a model's printout: ``print_tool.before_pruning(model)``,
    prune, then ``print_tool.after_pruning(model)`` prints (and returns) the changed lines."""

    _before: Optional[str] = None

    @staticmethod
    def before_pruning(model: nn.Module) -> None:
        print_tool._before = str(model)

    @staticmethod
    def after_pruning(model: nn.Module, do_print: bool = True) -> str:
        if print_tool._before is None:
            raise ValueError("call print_tool.before_pruning(model) before pruning it")
        changed = [
            line
            for line in difflib.unified_diff(
                print_tool._before.splitlines(), str(model).splitlines(), lineterm="", n=0
            )
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        text = "\n".join(changed)
        if do_print:
            print(text)
        return text
