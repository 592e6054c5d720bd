"""Whole blocks that can be removed: children of a ``ModuleList`` / ``Sequential`` that sit on
the residual stream, found from the trace without per-model tables.

A child is removable when the trace shows that skipping it leaves a valid model: it ran once;
an addition inside it reads its input (a skip connection) and its first output holds the same
positions of the same channels as its first input, dim by dim (``x + f(x)``: the output is on
the residual stream the input came from; a plain layer's output channels are its own); its input was the previous sibling's output; and its output was read
only inside the next sibling (or anywhere, for the last one: it is the container's result).
Otherwise the reason is kept, so a refusal can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch import nn

from torchslim.spaces.atoms import AtomTable
from torchslim.spaces.layout import DimLayout
from torchslim.spaces.trace import BlockTrace, TensorLayout


@dataclass
class Block:
    """A child of a container: ``container[index]`` of ``model``, named ``name``."""

    name: str
    container: str
    index: int
    module: nn.Module
    reason: Optional[str] = None
    #: dims of its input that carry channels (the residual stream's width)
    channel_dims: list[int] = field(default_factory=list)

    @property
    def removable(self) -> bool:
        return self.reason is None


def _same_dim(table: AtomTable, a: DimLayout, b: DimLayout) -> bool:
    if a.size != b.size or a.is_opaque != b.is_opaque:
        return False
    return a.is_opaque or np.array_equal(table.expand_rows(a.atoms), table.expand_rows(b.atoms))


def _shape(layout: TensorLayout) -> list[int]:
    return [dim.size for dim in layout]


def _why_not(table: AtomTable, trace: BlockTrace) -> Optional[str]:
    if trace.calls != 1:
        return "it does not run in the forward" if not trace.calls else "it runs more than once"
    if trace.inputs is None or trace.output is None:
        return "it takes or returns no tensor"
    if _shape(trace.inputs) != _shape(trace.output):
        return f"its output {_shape(trace.output)} differs from its input {_shape(trace.inputs)}"
    if not trace.skip:
        return "no addition inside it reads its input (it is not a residual block)"
    if not all(_same_dim(table, a, b) for a, b in zip(trace.inputs, trace.output)):
        return "its output channels are not its input's (it is not a residual block)"
    if not trace.chained:
        return "its input is not the previous block's output"
    if trace.read_by is not None:
        return f"its output is read by {trace.read_by}, not only by the next block"
    return None


def residual_blocks(model: nn.Module, table: AtomTable, traces: list[BlockTrace]) -> list[Block]:
    """Every traced child of a container, with why it cannot be removed (``None``: it can)."""
    blocks = []
    for trace in traces:
        container = model.get_submodule(trace.container)
        dims = [d for d, dim in enumerate(trace.inputs or []) if not dim.is_opaque]
        module = container[trace.index]
        reason = _why_not(table, trace)
        blocks.append(Block(trace.name, trace.container, trace.index, module, reason, dims))
    return blocks
