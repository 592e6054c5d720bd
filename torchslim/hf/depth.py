"""A Hugging Face config after whole layers were removed (:func:`torchslim.prune_blocks`).

Removing blocks ``idxs`` of a container that held ``of`` of them lowers every int field equal
to ``of`` whose name counts layers (``num_hidden_layers``) and drops those entries from every
list of ``of`` per-layer values (``layer_types``: the sliding-window pattern follows the layers
that remain)."""

from __future__ import annotations

import copy
from typing import Any

from torchslim.pruning.roles import Role


def removed_blocks(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The block-removal operations of a pruning history, in order."""
    return [op for step in history for op in step["ops"] if op["role"] == Role.BLOCKS.value]


def depth_changes(config: Any, of: int, idxs: list[int]) -> dict[str, Any]:
    """The fields of ``config`` that change when blocks ``idxs`` of ``of`` are removed."""
    gone = set(idxs)
    changes: dict[str, Any] = {}
    for name, value in vars(config).items():
        if type(value) is int and value == of and "layers" in name:
            changes[name] = of - len(gone)
        elif isinstance(value, (list, tuple)) and len(value) == of:
            changes[name] = type(value)(v for i, v in enumerate(value) if i not in gone)
    return changes


def shallower(config: Any, history: list[dict[str, Any]]) -> Any:
    """``config`` with the blocks the history removed taken out (``config`` itself if none)."""
    operations = removed_blocks(history)
    if not operations:
        return config
    config = copy.deepcopy(config)
    for op in operations:
        for name, value in depth_changes(config, op["of"], op["idxs"]).items():
            setattr(config, name, value)
    return config
