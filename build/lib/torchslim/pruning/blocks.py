"""Removing whole children of a ``ModuleList`` / ``Sequential`` (blocks), in place."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from torch import nn

#: Int attribute that transformers' layers keep as their position (the KV-cache slot).
LAYER_INDEX = "layer_idx"


def remove_blocks(container: nn.Module, idxs: Sequence[int]) -> Callable[[], None]:
    """Delete ``container[i]`` for each ``i`` of ``idxs``. Children named by position are
    renumbered (``layers.5`` becomes ``layers.4`` once ``layers.3`` is gone), and a
    ``layer_idx`` attribute equal to a child's old position inside it follows. Returns a
    function that puts everything back."""
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"blocks are removed from a ModuleList or Sequential, not {type(container).__name__}"
        )
    items = list(container._modules.items())
    gone = set(idxs)
    if not gone or min(gone) < 0 or max(gone) >= len(items):
        raise ValueError(f"block indices {sorted(gone)} out of range for {len(items)} blocks")
    positional = all(name == str(i) for i, (name, _) in enumerate(items))
    kept = [(i, name, module) for i, (name, module) in enumerate(items) if i not in gone]
    renumbered = []
    for position, (old, _, module) in enumerate(kept):
        for layer in module.modules():
            if (
                type(getattr(layer, LAYER_INDEX, None)) is int
                and getattr(layer, LAYER_INDEX) == old
            ):
                setattr(layer, LAYER_INDEX, position)
                renumbered.append((layer, old))
    before = container._modules
    container._modules = OrderedDict(
        (str(position) if positional else name, module)
        for position, (_, name, module) in enumerate(kept)
    )

    def restore() -> None:
        container._modules = before
        for layer, old in renumbered:
            setattr(layer, LAYER_INDEX, old)

    return restore
