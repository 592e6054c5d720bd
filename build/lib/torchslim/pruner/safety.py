"""The pruners' safety net: a step never hands back a model that fails the forward it was
traced with.

A step's groups are pruned together, then the pruned model runs its forward check (see
:mod:`torchslim.graph.forward_check`). If it fails, the step is undone and the groups that break
it are found by bisection over the step's selections (each probe prunes a prefix inside a trial
that is undone): the shortest failing prefix ends with an offender, which is refused with the
failure (exception and module named); the search goes on after it. The other groups are then
pruned.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from torch import nn

from torchslim.graph.checkpoint import Checkpoint, trial
from torchslim.graph.collector import collection_paused
from torchslim.graph.dependency import DependencyGraph, Group
from torchslim.pruning.journal import journaled

Selection = tuple[Group, list[int]]

#: Weights (bytes) above which a step's undo keeps only the removed positions (a journal, which
#: copies them) rather than the old tensors themselves: holding an LLM's old tensors until the
#: forward check passes would double its memory, while a small model's costs nothing to hold.
#: An undone step gives a small model back its parameter objects, a large one new ones.
JOURNAL_ABOVE = 1 << 29


@dataclass
class SafePruning:
    """What a checked step pruned, and the selections its forward check refused."""

    pruned: list[Selection] = field(default_factory=list)
    refused: list[tuple[Selection, str]] = field(default_factory=list)


@dataclass
class StepReport:
    """What one step pruned, and what it did not: groups (by root) with the channels removed,
    those of them whose channels pass through channel-mixing ops (with the ops), the groups
    ``exact_only`` left alone, and the groups the forward check refused (with the failure)."""

    pruned: list[tuple[str, int]]
    mixing: list[tuple[str, list[str]]]
    skipped_mixing: list[str]
    refused: list[tuple[str, str]]

    @classmethod
    def of(cls, result: SafePruning, skipped_mixing: list[str]) -> StepReport:
        return cls(
            pruned=[(g.root.label, len(classes)) for g, classes in result.pruned],
            mixing=[(g.root.label, sorted(g.mixing)) for g, _ in result.pruned if g.mixing],
            skipped_mixing=skipped_mixing,
            refused=[(g.root.label, reason) for (g, _), reason in result.refused],
        )

    def __str__(self) -> str:
        channels = sum(n for _, n in self.pruned)
        lines = [f"pruned {len(self.pruned)} groups ({channels} channels)"]
        if self.mixing:
            lines.append(
                f"{len(self.mixing)} of them pass through channel-mixing ops (not exact by "
                f"design): {', '.join(label for label, _ in self.mixing[:3])}"
                + (", ..." if len(self.mixing) > 3 else "")
            )
        if self.skipped_mixing:
            lines.append(f"exact_only left {len(self.skipped_mixing)} mixing groups alone")
        lines += [f"refused {label}: {reason}" for label, reason in self.refused]
        return "\n".join(lines)


def prune_merged(groups: Iterable[Group]) -> list[Selection]:
    """Prune each group, and return the classes removed per coupling (the same coupling can be
    chosen again in a later increment, with indices relative to what was left then)."""
    chosen: dict[int, Selection] = {}
    for group in groups:
        _, classes = chosen.setdefault(group.coupling.id, (group, []))
        classes.extend(group.selected_classes())
        with collection_paused():  # not while the next group is chosen: scores may take long
            group.prune()
    return list(chosen.values())


def prune_checked(graph: DependencyGraph, groups: Iterable[Group]) -> SafePruning:
    """Prune the groups; if the pruned model fails its forward check, prune only those that
    keep it running (see the module docstring). Config listeners are notified once."""
    with graph.deferred():
        with _undoable(graph) as checkpoint:
            try:
                chosen = prune_merged(groups)
                failure = graph.forward_failure()
            except BaseException:
                checkpoint.restore()
                raise
        if failure is None:
            return SafePruning(chosen)
        checkpoint.restore()
        result = _bisect(graph, chosen, str(failure))
        _apply(graph, result.pruned)
    return result


@contextmanager
def _undoable(graph: DependencyGraph) -> Iterator[Checkpoint]:
    """A checkpoint of the model before a step: by reference, or for weights above
    :data:`JOURNAL_ABOVE` through a journal of what the step removes."""
    if graph.model is not None and _weight_bytes(graph.model) <= JOURNAL_ABOVE:
        yield Checkpoint(graph)
        return
    with journaled() as journal:
        yield Checkpoint(graph, journal)


def _weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_meta)


def _apply(graph: DependencyGraph, selections: list[Selection]) -> None:
    for group, classes in selections:
        graph.group_of(group.coupling, group.root, classes).prune()


def _failure(graph: DependencyGraph, selections: list[Selection]) -> Optional[str]:
    with trial(graph), graph.deferred(notify=False):
        _apply(graph, selections)
        failure = graph.forward_failure()
    return None if failure is None else str(failure)


def _bisect(graph: DependencyGraph, chosen: list[Selection], failure: Optional[str]) -> SafePruning:
    """Split ``chosen``, whose pruning together fails with ``failure``, into the selections
    that keep the forward running and the offenders."""
    result = SafePruning()
    remaining = list(chosen)
    while remaining:
        if failure is None:
            result.pruned += remaining
            break
        lo, hi = 1, len(remaining)  # the shortest failing prefix, with its failure
        while lo < hi:
            mid = (lo + hi) // 2
            probe = _failure(graph, result.pruned + remaining[:mid])
            if probe is None:
                lo = mid + 1
            else:
                hi, failure = mid, probe
        result.pruned += remaining[: lo - 1]
        result.refused.append((remaining[lo - 1], failure))
        remaining = remaining[lo:]
        failure = _failure(graph, result.pruned + remaining) if remaining else None
    return result
