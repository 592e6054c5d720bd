"""Undo a trial: put a model and its dependency graph back as they were, copying no weights.

``Group.prune`` never edits a tensor in place: it replaces parameters and buffers by sliced
copies, sets attributes (``out_channels``, ``groups``, ``num_heads``, config fields), re-ties
shared weights and updates the graph's bookkeeping (classes removed per coupling, the terms of
every coupled parameter dim, the history). A :class:`Checkpoint` keeps references to all of it,
so restoring costs a few dictionary assignments per module where a deep copy of the model per
trial would copy every weight.

The graph's side is its :class:`~torchslim.graph.state.PruningState`, which snapshots and
restores itself; ``tests/test_search.py`` checks that a restored graph is indistinguishable
from a fresh one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

from torch import nn

from torchslim.graph.record import recorded
from torchslim.pruning.journal import Journal
from torchslim.pruning.reparametrised import replace_tensor

if TYPE_CHECKING:
    from torchslim.graph.dependency import DependencyGraph


class _ModuleState:
    """A module's attributes, parameters and buffers (references), and its config fields.

    With ``tensors=False`` only which parameters and buffers exist (and which are ``None``) is
    kept: a :class:`~torchslim.pruning.journal.Journal` restores their values."""

    def __init__(self, module: nn.Module, tensors: bool = True) -> None:
        self.module = module
        self.attributes = dict(vars(module))
        self.tensors = tensors
        self.parameters = dict(module._parameters) if tensors else _presence(module._parameters)
        self.buffers = dict(module._buffers) if tensors else _presence(module._buffers)
        config = self.attributes.get("config")
        keeps_fields = config is not None and hasattr(config, "__dict__")
        self.config: Optional[tuple[Any, dict]] = (
            (config, dict(vars(config)))
            if keeps_fields and not isinstance(config, nn.Module)
            else None
        )

    def restore(self) -> None:
        state = vars(self.module)
        state.clear()
        state.update(self.attributes)
        for current, saved in (
            (self.module._parameters, self.parameters),
            (self.module._buffers, self.buffers),
        ):
            if self.tensors:
                current.clear()
                current.update(saved)
                continue
            for name in [n for n in current if n not in saved]:
                del current[name]  # added by the pruning (a bias for compensation)
            current.update({name: None for name, present in saved.items() if not present})
        if self.config is not None:
            config, fields = self.config
            vars(config).clear()
            vars(config).update(fields)


def _presence(tensors: dict[str, Any]) -> dict[str, bool]:
    return {name: value is not None for name, value in tensors.items()}


class Checkpoint:
    """Everything pruning through ``graph`` can change, saved by reference.

    With a ``journal`` (:func:`torchslim.pruning.journal.journaled`, active while the pruning
    runs) the old tensors are not held: the journal keeps the removed positions and rebuilds
    them on :meth:`restore` (the restored parameters are then new objects)."""

    def __init__(self, graph: DependencyGraph, journal: Optional[Journal] = None) -> None:
        if graph.model is None or graph.state is None:
            raise RuntimeError("call build_dependency(model, example_inputs) first")
        self.graph = graph
        self.journal = journal
        self._model_history = len(recorded(graph.model, "history", []))
        self._modules = [_ModuleState(m, journal is None) for m in graph.model.modules()]
        self._state = graph.state.snapshot()

    def restore(self) -> None:
        if self.journal is not None:
            self.journal.undo(replace_tensor)
        for state in self._modules:
            state.restore()
        self.graph.state.restore(self._state)
        if self.journal is not None:
            for tensor, owners in self.graph.state.ties.groups:
                for module, name in owners:
                    module._parameters[name] = tensor
        history = recorded(self.graph.model, "history")
        if history is not None:
            del history[self._model_history :]


@contextmanager
def trial(graph: DependencyGraph) -> Iterator[DependencyGraph]:
    """Prune through ``graph`` inside the block; on leaving it (even by an error) the model and
    the graph are back to their state on entry."""
    checkpoint = Checkpoint(graph)
    try:
        yield graph
    finally:
        checkpoint.restore()
