"""Weight masks that hold through training.

A :class:`MaskSet` owns one boolean mask per pruned parameter and keeps every masked weight at
exactly zero: gradients of masked weights are zeroed (a tensor hook, so hand-written updates
and optimizer state see nothing), and every ``torch.optim`` step re-applies the masks (a global
post-step hook, so momentum or Adam state built before pruning cannot revive a weight).
:meth:`MaskSet.remove` bakes the zeros in and removes every hook: the model is a plain model
again, with its original ``state_dict`` keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


class MaskSet:
    """Masks for a set of parameters of one model."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.model = model
        self.params = params
        self.masks: dict[str, torch.Tensor] = {
            name: torch.ones_like(param, dtype=torch.bool) for name, param in params.items()
        }
        self._handles: list[Any] = []
        for name, param in params.items():
            self._handles.append(param.register_hook(self._grad_hook(name)))
        self._handles.append(register_optimizer_step_post_hook(self._after_step))

    def _after_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.apply()

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad.dtype)

        return hook

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight in place."""
        for name, param in self.params.items():
            param.mul_(self.masks[name].to(param.dtype))

    def remove(self) -> nn.Module:
        """Bake the zeros in and drop every hook."""
        self.apply()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.model


def sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return 1.0 - int(torch.count_nonzero(tensor)) / max(1, tensor.numel())
