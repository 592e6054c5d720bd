"""The graph's pruning state: everything pruning through a graph changes besides the model's
own tensors and attributes, in one object with a small interface.

That is the classes removed from each coupling so far, the members' terms (which positions
each parameter dim still has), the parameter ties and the steps taken. ``Group`` asks it which
channels are live; :class:`~torchslim.graph.checkpoint.Checkpoint` saves and restores it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from torch import nn

from torchslim.pruning.tied import TiedParameters
from torchslim.spaces.analysis import Analysis, Coupling, ParamDim

Removed = dict[int, set[int]]
#: positions of each parameter dim (by ``id``) that removing some channels deletes
Positions = dict[int, np.ndarray]


class PruningState:
    """Classes removed per coupling, members' terms, tied parameters and the steps taken."""

    def __init__(self, analysis: Analysis, model: nn.Module) -> None:
        self.removed: Removed = {}
        self.ties = TiedParameters(model)
        self.history: list[dict[str, Any]] = []
        members = {id(m): m for m in analysis.param_dims}
        for coupling in analysis.couplings.values():
            members.update((id(m), m) for m in coupling.members)
        self._members: list[ParamDim] = list(members.values())

    def live(self, coupling: Coupling) -> list[int]:
        """The coupling's classes not removed yet, in order (a group's indices index these)."""
        removed = self.removed.get(coupling.id)
        if not removed:
            return list(coupling.classes)
        return [c for c in coupling.classes if c not in removed]

    def size(self, coupling: Coupling) -> int:
        """How many of the coupling's classes are not removed yet."""
        return len(coupling.classes) - len(self.removed.get(coupling.id, ()))

    def removed_with(self, coupling: Coupling, classes: np.ndarray) -> Removed:
        """Classes removed so far per coupling, plus ``classes`` of ``coupling``."""
        removed = dict(self.removed)
        removed[coupling.id] = removed.get(coupling.id, set()) | {int(c) for c in classes}
        return removed

    def remove(
        self,
        coupling: Coupling,
        classes: np.ndarray,
        positions: Optional[Positions] = None,
    ) -> None:
        """Record ``classes`` of ``coupling`` as removed, and drop their positions from the
        members' terms (only members of the coupling can hold its classes; ``positions``:
        those positions per member ``id``, where known)."""
        for member in coupling.members:
            gone = member.positions_of(classes) if positions is None else positions[id(member)]
            if gone.size:
                member.terms = np.delete(member.terms, gone, axis=0)
        self.removed = self.removed_with(coupling, classes)

    def snapshot(self) -> tuple[Any, ...]:
        """Everything :meth:`restore` needs, by reference (pruning replaces, never mutates)."""
        terms = [(member, member.terms) for member in self._members]
        return self.removed, list(self.ties.groups), len(self.history), terms

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        removed, ties, history, terms = snapshot
        self.removed = removed
        self.ties.groups[:] = ties
        del self.history[history:]
        for member, saved in terms:
            member.terms = saved
