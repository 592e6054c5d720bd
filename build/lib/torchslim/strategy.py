"""Channel-selection strategies under their original names (``tp.strategy.L1Strategy``)."""

from __future__ import annotations

import random
from typing import Sequence

import torch


class BaseStrategy:
    """Pick ``amount`` (a fraction) of a weight's output channels to remove."""

    def __call__(self, weights: torch.Tensor, amount: float = 0.0, round_to: int = 1) -> list[int]:
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        total = weights.shape[0]
        count = int(amount * total)
        count = min(total - round_to if total > round_to else total - 1, count - count % round_to)
        if count <= 0:
            return []
        return self.select(weights, count)

    def select(self, weights: torch.Tensor, count: int) -> list[int]:
        raise NotImplementedError


class RandomStrategy(BaseStrategy):
    def select(self, weights: torch.Tensor, count: int) -> list[int]:
        return sorted(random.sample(range(weights.shape[0]), count))


class LNStrategy(BaseStrategy):
    """Remove the channels with the smallest L-p norm."""

    def __init__(self, p: float) -> None:
        self.p = p

    def select(self, weights: torch.Tensor, count: int) -> list[int]:
        norms = weights.detach().flatten(1).norm(p=self.p, dim=1)
        return sorted(torch.argsort(norms)[:count].tolist())


class L1Strategy(LNStrategy):
    def __init__(self) -> None:
        super().__init__(p=1)


class L2Strategy(LNStrategy):
    def __init__(self) -> None:
        super().__init__(p=2)


__all__: Sequence[str] = [
    "BaseStrategy",
    "L1Strategy",
    "L2Strategy",
    "LNStrategy",
    "RandomStrategy",
]
