"""One epoch of classification training, shared by ``torchslim demo`` and ``finetune``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def train_epoch(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    batch_size: int = 64,
    after_backward: Optional[Callable[[], None]] = None,
) -> tuple[float, int]:
    """Shuffled mini-batches (seeded by ``epoch``), cross-entropy; ``after_backward`` runs
    between backward and the optimizer step (sparse-training regularisers). Returns the summed
    loss and the number of samples."""
    x, y = data
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    total = 0.0
    for start in range(0, len(x), batch_size):
        batch = order[start : start + batch_size]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total, len(x)
