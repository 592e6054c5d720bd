"""Schedules: how much is pruned by each iterative step, and how strong regularisation is."""

from __future__ import annotations


def linear_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """Cumulative ratios after each of ``steps`` steps: ``[r/steps, 2r/steps, ..., r]``."""
    return [pruning_ratio * (k + 1) / steps for k in range(steps)]


def decaying_l1(epoch: int, epochs: int, base: float = 1e-2, floor: float = 0.1) -> float:
    """The BN-L1 strength of the YOLOv8 recipe: ``base * (1 - (1 - floor) * epoch / epochs)``,
    decaying linearly from ``base`` to ``floor * base`` over training."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    return base * (1 - (1 - floor) * epoch / epochs)
