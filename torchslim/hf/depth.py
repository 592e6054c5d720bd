"""A Hugging Face config after whole layers were removed (:func:`torchslim.prune_blocks`).

Removing blocks ``idxs`` of a container that held ``of`` of them lowers ``num_hidden_layers``
(``n_layer`` and other names through the config's attribute map) and drops those entries from
the per-layer lists (``layer_types``: the sliding-window pattern follows the layers that
remain)."""

from __future__ import annotations

import copy
from typing import Any

from torchslim.hf.config import LAYER_CONFIG, layer_overrides
from torchslim.pruning.roles import Role


def removed_blocks(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The block-removal operations of a pruning history, in order."""
    return [op for step in history for op in step["ops"] if op["role"] == Role.BLOCKS.value]


def depth_changes(config: Any, of: int, idxs: list[int]) -> dict[str, Any]:
    """The fields of ``config`` that change when blocks ``idxs`` of ``of`` are removed: its
    layer count (``num_hidden_layers``, whatever the class calls it) and its lists with one
    descriptor per layer (``layer_types``), when they count ``of`` layers, and its per-layer
    overrides (``per_layer_config``), renumbered."""
    gone = set(idxs)
    changes: dict[str, Any] = {}
    if getattr(config, "num_hidden_layers", None) == of:
        changes["num_hidden_layers"] = of - len(gone)
    for name, value in vars(config).items():
        per_layer = isinstance(value, (list, tuple)) and len(value) == of and "layer" in name
        if per_layer and not any(type(v) is int for v in value):  # not a list of layer indices
            changes[name] = type(value)(v for i, v in enumerate(value) if i not in gone)
    overrides = layer_overrides(config)
    if overrides and "num_hidden_layers" in changes:  # after it: overrides are checked by it
        kept = [i for i in range(of) if i not in gone]
        changes[LAYER_CONFIG] = {
            new: overrides[old] for new, old in enumerate(kept) if old in overrides
        } or None
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
