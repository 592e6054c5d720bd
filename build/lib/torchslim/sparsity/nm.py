"""N:M semi-structured sparsity (2:4, 1:4, 4:8): in every block of ``m`` consecutive weights
along a layer's input dimension, only ``n`` stay non-zero."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
from torch import nn

from torchslim.sparsity.masks import MaskSet

LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_pattern(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"an N:M pattern needs integers 0 < n < m, got {n}:{m}")


def _blocks(weight: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """``[..., m]`` blocks along the input dim (dim 1; for convolutions, at every kernel tap)."""
    inputs = weight.shape[1]
    if inputs % m:
        raise ValueError(
            f"{name}: input size {inputs} is not divisible by m={m}; prune channels with "
            f"round_to={m} or skip this layer"
        )
    moved = weight.movedim(1, -1)
    return moved.reshape(-1, inputs // m, m)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> torch.Tensor:
    """Keep the ``n`` largest magnitudes of every block of ``m`` input weights."""
    _check_pattern(n, m)
    blocks = _blocks(weight.detach().abs(), m, name)
    top = blocks.topk(n, dim=-1).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    moved_shape = weight.movedim(1, -1).shape
    return keep.reshape(moved_shape).movedim(-1, 1)


def satisfies_nm(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> bool:
    """At most ``n`` non-zeros in every block of ``m`` input weights."""
    _check_pattern(n, m)
    return bool((_blocks(weight.detach(), m, name) != 0).sum(-1).le(n).all())


def check_nm(model: nn.Module, n: int = 2, m: int = 4, layer_types=LAYERS) -> list[str]:
    """Names of the layer weights that violate the pattern (an empty list: all satisfy it)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, layer_types)
        and not satisfies_nm(module.weight, n, m, f"{name}.weight")
    ]


class NMSparsifier:
    """Apply an N:M pattern to every matching layer and keep it through training.

    A layer whose input size is not divisible by ``m`` is refused with an error naming it, never
    skipped silently; ``skip(name, module)`` leaves chosen layers dense."""

    def __init__(
        self,
        model: nn.Module,
        n: int = 2,
        m: int = 4,
        layer_types: tuple[type, ...] = LAYERS,
        skip: Optional[Callable[[str, nn.Module], bool]] = None,
    ) -> None:
        _check_pattern(n, m)
        self.n, self.m = n, m
        layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, layer_types) and not (skip and skip(name, module))
        }
        if not layers:
            raise ValueError("no layer to sparsify")
        for name, module in layers.items():
            _blocks(module.weight, m, f"{name}.weight")
        self.masks = MaskSet(model, {f"{k}.weight": v.weight for k, v in layers.items()})
        self.step()

    def step(self) -> None:
        """Recompute the masks from the current weights and zero the rest."""
        for name, param in self.masks.params.items():
            self.masks.masks[name] = nm_mask(param, self.n, self.m, name)
        self.masks.apply()

    def strip(self) -> nn.Module:
        return self.masks.remove()


def to_semi_structured(model: nn.Module, layer_types=(nn.Linear,)) -> list[str]:
    """Swap 2:4-sparse Linear weights for ``torch.sparse.to_sparse_semi_structured`` tensors.

    The kernels need a CUDA GPU with compute capability 8.0+ and fp16/bf16 weights; elsewhere
    nothing is converted, a warning says why, and the (still 2:4-sparse) model is unchanged."""
    reason = _semi_structured_unavailable(model)
    if reason:
        warnings.warn(f"semi-structured sparsity not applied: {reason}", stacklevel=2)
        return []
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, layer_types) and satisfies_nm(module.weight, 2, 4, name):
            sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach())
            module.weight = nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
    return converted


def _semi_structured_unavailable(model: nn.Module) -> Union[str, None]:
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda":
        return "the model is not on a CUDA device"
    if torch.cuda.get_device_capability(param.device) < (8, 0):
        return "the GPU's compute capability is below 8.0"
    if param.dtype not in (torch.float16, torch.bfloat16):
        return f"weights are {param.dtype}, the kernels take float16 or bfloat16"
    return None
