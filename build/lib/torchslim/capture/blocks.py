"""Watching the children of ``ModuleList`` / ``Sequential`` containers while tracing: the
candidates for removal as whole blocks (see :mod:`torchslim.graph.blocks`)."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from torchslim.spaces.trace import BlockTrace, TraceState, first_tensor


def _entered(state: TraceState, block: BlockTrace, _module, args, kwargs) -> None:
    block.calls += 1
    x = first_tensor((args, kwargs))
    if x is None:
        return
    block.inputs = state.layout(x)
    state.block_inputs.setdefault(x, []).append(block)  # nested blocks share their input
    producer = state.block_outputs.get(x)
    block.chained = block.index == 0 or (producer is not None and producer.next == block.name)


def _left(state: TraceState, block: BlockTrace, _module, _args, _kwargs, output) -> None:
    y = first_tensor(output)
    if y is None:
        return
    block.output = state.layout(y)
    state.block_outputs[y] = block


@contextmanager
def block_hooks(model: nn.Module, state: TraceState, record: bool = True) -> Iterator[None]:
    """Inside the block, note for every child of a container what :class:`BlockTrace` holds
    (``record=False``: nothing, e.g. for the train-mode trace)."""
    handles = []
    for name, container in model.named_modules() if record else ():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        children = list(container._modules.values())  # repeated instances keep their places
        names = [f"{name}.{child}" if name else child for child in container._modules]
        for index, child in enumerate(children):
            following = names[index + 1] if index + 1 < len(names) else None
            block = state.blocks.setdefault(
                names[index], BlockTrace(names[index], name, index, following)
            )
            handles.append(
                child.register_forward_pre_hook(
                    functools.partial(_entered, state, block), with_kwargs=True
                )
            )
            handles.append(
                child.register_forward_hook(
                    functools.partial(_left, state, block), with_kwargs=True
                )
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
