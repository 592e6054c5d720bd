"""Sizes after pruning: of tracked tensor dims, of attributes, of size arguments.

Every size the forward computed from shapes or attributes is a function of which channel classes
are removed. A tensor dim's size is the number of its positions whose term survives. An
attribute used as a size by itself (``view(..., self.head_dim)``) has the size of the positions
it counts. An attribute only ever used inside larger expressions (``self.num_heads *
self.head_dim`` as a slice bound) is *solved* from the first size argument in which it is the
only unknown. :class:`SizeModel` evaluates all of these for any set of removed classes: the
graph uses it to check size arguments before pruning and to update attributes after.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from torchslim.spaces.attributes import AttributeSlot
from torchslim.spaces.layout import DimLayout
from torchslim.spaces.symbolic import Expr, compare, evaluate, symbols
from torchslim.spaces.trace import Comparison, SizeCheck


class UnknownAttribute(Exception):
    """An attribute whose value after pruning cannot be inferred."""

    def __init__(self, slot: AttributeSlot) -> None:
        super().__init__(slot.label)
        self.slot = slot


def surviving(terms: np.ndarray, removed: np.ndarray) -> int:
    """Number of positions none of whose classes is removed."""
    if terms.shape[1] == 0 or removed.size == 0:
        return terms.shape[0]
    return int(terms.shape[0] - np.isin(terms, removed).any(axis=1).sum())


class SizeModel:
    """Sizes of dims and attributes as functions of the removed classes."""

    def __init__(self, checks: list[SizeCheck], expand: Callable[[Any], np.ndarray]) -> None:
        self._terms: dict[int, np.ndarray] = {}
        self._expand = expand
        self.definitions = _definitions(checks)
        self.slots = [
            slot for slot in _all_slots(checks) if slot.layout is not None or self.defined(slot)
        ]

    def defined(self, slot: AttributeSlot) -> bool:
        return slot in self.definitions

    def terms(self, key: Any) -> np.ndarray:
        """Class terms of a tensor dim, of a check's positions, or of a bound attribute."""
        layout = key.layout if isinstance(key, AttributeSlot) else key
        cached = self._terms.get(id(layout))
        if cached is None:
            atoms = layout.atoms if isinstance(layout, DimLayout) else layout
            cached = self._terms[id(layout)] = self._expand(atoms)
        return cached

    def involved(self, key: Any, solving: frozenset = frozenset()) -> list[np.ndarray]:
        """Every terms array that a dim's, attribute's or check's size depends on."""
        if isinstance(key, SizeCheck):
            keys = [s for s in symbols(key.expr) if s not in solving]
            return [self.terms(key.atoms)] + [t for s in keys for t in self.involved(s, solving)]
        if isinstance(key, AttributeSlot) and key.layout is None:
            definition = self.definitions.get(key)
            return [] if definition is None else self.involved(definition, solving | {key})
        return [self.terms(key)]

    def size(self, key: Any, removed: np.ndarray) -> int:
        """The size of a dim or attribute once ``removed`` classes are gone."""
        if isinstance(key, AttributeSlot) and key.layout is None:
            definition = self.definitions.get(key)
            if definition is None:
                raise UnknownAttribute(key)
            return self._solve(key, definition, removed)
        return surviving(self.terms(key), removed)

    def involved_in(self, expr: Expr) -> list[np.ndarray]:
        """Every terms array the value of an expression depends on."""
        return [terms for key in symbols(expr) for terms in self.involved(key)]

    def current(self, key: Any, removed: np.ndarray) -> int:
        """Like :meth:`size`, but an attribute that pruning never sets keeps its value."""
        if isinstance(key, AttributeSlot) and key.layout is None and not self.defined(key):
            return key.value
        return self.size(key, removed)

    def holds(self, comparison: Comparison, removed: np.ndarray) -> bool:
        """Whether a comparison keeps the outcome it had while tracing."""

        def size(key: Any) -> int:
            return self.current(key, removed)

        lhs, rhs = evaluate(comparison.lhs, size), evaluate(comparison.rhs, size)
        return compare(comparison.op, lhs, rhs) == comparison.outcome

    def value(self, check: SizeCheck, removed: np.ndarray) -> int:
        """What a size argument evaluates to once ``removed`` classes are gone."""
        return evaluate(check.expr, lambda key: self.size(key, removed))

    def _solve(self, slot: AttributeSlot, check: SizeCheck, removed: np.ndarray) -> int:
        """The value of ``slot`` that makes ``check`` hold (-1 if there is none)."""
        target = surviving(self.terms(check.atoms), removed)
        cache: dict[int, int] = {}

        def value_with(v: int) -> int:
            return evaluate(
                check.expr,
                lambda key: (
                    v if key is slot else cache.setdefault(id(key), self.size(key, removed))
                ),
            )

        lo, hi = 0, max(slot.value, 1)
        while lo < hi:
            mid = (lo + hi) // 2
            if value_with(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        if value_with(lo) == target:
            return lo
        return next((v for v in range(min(slot.value, 4096) + 1) if value_with(v) == target), -1)


def _all_slots(checks: list[SizeCheck]) -> list[AttributeSlot]:
    return list(dict.fromkeys(slot for check in checks for slot in check.attributes))


def _definitions(checks: list[SizeCheck]) -> dict[AttributeSlot, SizeCheck]:
    """For each attribute never used as a size by itself, the first check where it is the only
    unknown (repeated until no more attributes can be solved)."""
    known = {slot for slot in _all_slots(checks) if slot.layout is not None}
    definitions: dict[AttributeSlot, SizeCheck] = {}
    changed = True
    while changed:
        changed = False
        for check in checks:
            unknown = list(dict.fromkeys(s for s in check.attributes if s not in known))
            if len(unknown) == 1:
                definitions[unknown[0]] = check
                known.add(unknown[0])
                changed = True
    return definitions


def unknown_in(check: SizeCheck, model: SizeModel) -> Optional[AttributeSlot]:
    """An attribute of ``check`` whose value cannot be inferred, if any."""
    for slot in check.attributes:
        if slot.layout is None and not model.defined(slot):
            return slot
    return None
