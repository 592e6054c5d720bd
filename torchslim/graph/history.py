"""The pruning steps applied to a model, kept on the model itself so that it can be saved with
its plan (:func:`torchslim.save_pruned`) without the graph that pruned it."""

from __future__ import annotations

from typing import Any

from torch import nn

HISTORY_ATTRIBUTE = "_torchslim_history"


def model_history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps applied to ``model`` so far (a list the graph appends to)."""
    history = model.__dict__.get(HISTORY_ATTRIBUTE)
    if history is None:
        history = []
        model.__dict__[HISTORY_ATTRIBUTE] = history
    return history
