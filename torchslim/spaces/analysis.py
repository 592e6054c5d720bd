"""Turning a finished trace into coupled groups.

After the forward pass every parameter dimension is expanded into terms of primitive atom
classes. Classes that were created together or coupled position by position form a *coupling*
(one union-find component over atom families): removing class ``i`` of a coupling removes, in
every parameter dim, each position whose term contains ``i``. Deferred size checks are
evaluated here by perturbation: each tracked int argument is re-evaluated with a few classes of
each coupling removed and compared with the size the layouts predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from torchslim.spaces.atoms import NO_ATOM, AtomTable
from torchslim.spaces.attributes import AttributeSlot
from torchslim.spaces.integers import distinct, distinct_rows, first_occurrences
from torchslim.spaces.layout import DimLayout
from torchslim.spaces.sizes import SizeModel, surviving, unknown_in
from torchslim.spaces.symbolic import describe
from torchslim.spaces.trace import SizeCheck, TensorRef, TraceState


@dataclass
class ParamDim:
    """One dimension of one parameter or buffer, with the class term of each position."""

    ref: TensorRef
    dim: int
    terms: np.ndarray  # [n, p] class roots, NO_ATOM padded

    @property
    def label(self) -> str:
        return f"{self.ref.qualified}[dim {self.dim}]"

    def positions_of(self, classes: np.ndarray) -> np.ndarray:
        """Positions removed when ``classes`` are removed."""
        if self.terms.shape[1] == 0 or classes.size == 0:
            return np.zeros(0, np.int64)
        if classes.size > 1 and (classes[1:] < classes[:-1]).any():
            classes = np.sort(classes)
        # a binary search per term: on a few hundred positions several times faster than
        # np.isin, which builds a lookup table per call
        _, hit = lookup(classes, self.terms)
        return np.nonzero(hit.any(axis=1) if hit.shape[1] > 1 else hit[:, 0])[0]


def lookup(ascending: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``values``, its slot in the non-empty sorted array ``ascending`` and
    whether it is there (``ascending[slot] == value``)."""
    slot = np.minimum(ascending.searchsorted(values), ascending.size - 1)
    return slot, ascending[slot] == values


@dataclass
class Coupling:
    """A set of atom classes that index the same channels across many layers."""

    id: int
    classes: list[int] = field(default_factory=list)
    members: list[ParamDim] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)
    mixing: set[str] = field(default_factory=set)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class Analysis:
    """Couplings, their members and their frozen classes, computed once after tracing."""

    def __init__(self, state: TraceState) -> None:
        self.table: AtomTable = state.table
        table = self.table
        n = len(table)
        roots = table.roots(np.arange(n, dtype=np.int64)) if n else np.zeros(0, np.int64)
        defined = table.defined_atoms()
        primitive = ~np.isin(roots, defined)
        families = np.asarray(table.family_of, dtype=np.int64)
        links = _UnionFind(len(table.families))
        if n:
            mine, theirs = families[primitive], families[roots[primitive]]
            linked = mine != theirs
            count = max(len(table.families), 1)
            for pair in distinct(mine[linked] * count + theirs[linked]).tolist():
                links.union(*divmod(pair, count))
        self._coupling_of_family = np.array(
            [links.find(f) for f in range(len(table.families))], np.int64
        )
        self._expanded: dict[int, np.ndarray] = {}
        dims = [
            (state.refs[tensor_id], d, dim)
            for tensor_id, layout in state.param_layouts.items()
            for d, dim in enumerate(layout)
        ]
        distinct_dims = list({id(dim): dim for _, _, dim in dims}.values())
        for dim, terms in zip(
            distinct_dims, table.expand_many([dim.atoms for dim in distinct_dims])
        ):
            self._expanded[id(dim)] = terms
        self.param_dims = [ParamDim(ref, d, self.expand(dim)) for ref, d, dim in dims]
        self._evaluate_checks(state)
        self.couplings = self._collect()
        self.cofactors = self._cofactors()
        self._expanded.clear()
        self.checks = state.checks
        self._check_couplings = [self._couplings_in(self.sizes.involved(c)) for c in self.checks]
        self.comparisons = state.comparisons
        self._comparison_couplings = [
            self._couplings_in(self.sizes.involved_in(c.lhs) + self.sizes.involved_in(c.rhs))
            for c in self.comparisons
        ]
        self._slot_couplings = [
            self._couplings_in(self.sizes.involved(s)) for s in self.sizes.slots
        ]

    def _cofactors(self) -> dict[int, set[int]]:
        """For each coupling, the couplings whose classes multiply its own in some parameter
        dim (attention heads and the offsets inside a head: one width, two groups)."""
        partners: dict[int, set[int]] = {}
        products: dict[int, list[np.ndarray]] = {}  # by width: one pass over all their rows
        for member in self.param_dims:
            if member.terms.shape[1] >= 2 and member.terms.shape[0]:
                products.setdefault(member.terms.shape[1], []).append(member.terms)
        for terms in products.values():
            for row in distinct_rows(self.couplings_of(np.concatenate(terms))).tolist():
                factors = set(row) - {-1}
                for coupling in factors:
                    partners.setdefault(coupling, set()).update(factors - {coupling})
        return partners

    def _couplings_in(self, terms: list[np.ndarray]) -> set[int]:
        if not terms:
            return set()
        classes = distinct(np.concatenate([t.reshape(-1) for t in terms]))
        return set(self.couplings_of(classes).tolist()) - {-1}

    def _removed_for(self, couplings: set[int], removed: dict[int, set[int]]) -> np.ndarray:
        classes = [c for k in couplings for c in removed.get(k, ())]
        return np.array(classes, np.int64)

    def size_violation(self, coupling: int, removed: dict[int, set[int]]) -> Optional[str]:
        """Why removing these classes (per coupling, cumulative) would break a size argument
        or leave an attribute without a fitting value; ``None`` if nothing breaks."""
        for check, couplings in zip(self.checks, self._check_couplings):
            if coupling in couplings and unknown_in(check, self.sizes) is None:
                gone = self._removed_for(couplings, removed)
                got = self.sizes.value(check, gone)
                expected = surviving(self.sizes.terms(check.atoms), gone)
                if got != expected:
                    return _size_argument_breaks(check, got, expected)
        for comparison, couplings in zip(self.comparisons, self._comparison_couplings):
            if coupling in couplings and not self.sizes.holds(
                comparison, self._removed_for(couplings, removed)
            ):
                return (
                    f"pruning would change the outcome of `{comparison.text}` (now "
                    f"{comparison.outcome}) in {comparison.where}"
                )
        for slot, value in self.attribute_values(coupling, removed):
            if value < 0:
                return f"no value of attribute {slot.label} fits the pruned sizes"
        return None

    def attribute_values(
        self, coupling: int, removed: dict[int, set[int]]
    ) -> list[tuple[AttributeSlot, int]]:
        """The values of the attributes that count channels of ``coupling``, once the given
        classes (per coupling, cumulative) are removed."""
        return [
            (slot, self.sizes.size(slot, self._removed_for(couplings, removed)))
            for slot, couplings in zip(self.sizes.slots, self._slot_couplings)
            if coupling in couplings
        ]

    def expand(self, dim: DimLayout) -> np.ndarray:
        cached = self._expanded.get(id(dim))
        if cached is None:
            cached = self.table.expand_rows(dim.atoms)
            self._expanded[id(dim)] = cached
        return cached

    def coupling_of(self, cls: int) -> int:
        """The coupling holding a class (``-1`` for classes in no parameter)."""
        return int(self.couplings_of(np.array([cls], np.int64))[0])

    def couplings_of(self, classes: np.ndarray) -> np.ndarray:
        """The coupling holding each class (``-1``: none, or ``NO_ATOM``)."""
        classes = np.asarray(classes, np.int64)
        inside = (classes >= 0) & (classes < self._coupling_of_class.size)
        return np.where(inside, self._coupling_of_class[np.where(inside, classes, 0)], -1)

    def members_of(self, module: Any) -> list[ParamDim]:
        """The parameter dims of one module (indexed on first use, by module object, so a deep
        copy of the graph indexes its own modules)."""
        if self._by_module is None:
            self._by_module = {}
            for member in self.param_dims:
                self._by_module.setdefault(member.ref.module, []).append(member)
        return self._by_module.get(module, [])

    def _classes_by_coupling(self, terms: list[np.ndarray]) -> dict[int, np.ndarray]:
        present = distinct(np.concatenate([t.reshape(-1) for t in terms]))
        present = present[present != NO_ATOM]
        owners = self._coupling_of_family[self.table.family_of[present]]
        return {int(k): present[owners == k] for k in distinct(owners)}

    def _evaluate_checks(self, state: TraceState) -> None:
        """Freeze couplings whose removal would make a size argument wrong, and positions whose
        size comes from an attribute that cannot be inferred."""
        sizes = self.sizes = SizeModel(state.checks, self.table.expand_rows)
        for check in state.checks:
            unknown = unknown_in(check, sizes)
            if unknown is not None:
                self.table.freeze_many(
                    check.atoms,
                    f"size from attribute {unknown.label} in {check.where}: its value after "
                    "pruning cannot be inferred (the forward never uses it as a size by itself)",
                )
                continue
            involved = self._classes_by_coupling(sizes.involved(check))
            for coupling, classes in involved.items():
                for removed in _perturbations(classes):
                    expected = surviving(sizes.terms(check.atoms), removed)
                    got = sizes.value(check, removed)
                    if got != expected:
                        self._freeze_coupling(coupling, _size_argument_breaks(check, got, expected))
                        break

    def _freeze_coupling(self, coupling: int, reason: str) -> None:
        members = np.nonzero(self._coupling_of_family[self.table.family_of] == coupling)[0]
        self.table.freeze_many(members, reason)

    def _collect(self) -> dict[int, Coupling]:
        """Couplings: connected families, then split so that the classes of one coupling
        appear in exactly the same parameter dims (a DenseNet layer's new features are one
        coupling, not its whole block's concatenation).

        Computed over all (parameter dim, class) pairs at once: a coupling's classes are
        ordered by where they first appear (parameter dims in order, then position), and
        couplings by their first class."""
        held, numbers = _all_terms(self.param_dims)
        members, classes = _holdings(held, numbers)
        ordered_classes = _by_first_appearance(held, len(self.table))
        ordered_couplings = self._coupling_of_family[self.table.family_of[ordered_classes]]
        by_coupling = np.argsort(ordered_couplings, kind="stable")  # each in first-seen order
        starts = np.flatnonzero(np.diff(ordered_couplings[by_coupling], prepend=-2))
        members_of, signature_of = _signatures(
            classes, members, len(self.param_dims), len(self.table)
        )
        grouped = ordered_classes[by_coupling]
        bounds = [*starts.tolist(), grouped.size]  # coupling k: grouped[bounds[k]:bounds[k + 1]]
        signatures = signature_of(grouped)
        table = self.table
        roots = table.roots(grouped)
        couplings: dict[int, Coupling] = {}
        self._coupling_of_class = np.full(len(table), -1, np.int64)
        self._by_module: Optional[dict[Any, list[ParamDim]]] = None
        marked = np.zeros(len(table), bool)
        marked[list(set(table.frozen) | set(table.mixing))] = True
        for start in np.argsort(by_coupling[starts], kind="stable").tolist():
            run = slice(bounds[start], bounds[start + 1])
            for mine, mine_roots in _same_signature(grouped[run], roots[run], signatures[run]):
                part = couplings[len(couplings)] = Coupling(len(couplings))
                part.members = [self.param_dims[m] for m in members_of(int(mine[0]))]
                part.classes = mine.tolist()
                self._coupling_of_class[mine] = part.id
                hits = marked[mine_roots]
                if not hits.any():
                    continue
                for cls, root in zip(mine[hits].tolist(), mine_roots[hits].tolist()):
                    if root in table.frozen:
                        part.frozen[cls] = table.frozen[root]
                    part.mixing.update(table.mixing.get(root, ()))
        return couplings


def _same_signature(
    classes: np.ndarray, roots: np.ndarray, signatures: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A connected run of classes (and their roots) split by the parameter dims holding them
    (their signatures), the parts in the order their first class appears."""
    if (signatures == signatures[0]).all():
        return [(classes, roots)]
    _, first, inverse = np.unique(signatures, return_index=True, return_inverse=True)
    chosen = [inverse.reshape(-1) == k for k in np.argsort(first, kind="stable").tolist()]
    return [(classes[c], roots[c]) for c in chosen]


def _all_terms(param_dims: list[ParamDim]) -> tuple[np.ndarray, np.ndarray]:
    """The classes of every parameter dim's terms, dim after dim, position after position
    (``NO_ATOM`` left out), and the number of the dim each comes from."""
    flat = [member.terms.reshape(-1) for member in param_dims]
    if not flat:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes = np.array([f.size for f in flat], np.int64)
    classes = np.concatenate(flat)
    numbers = np.repeat(np.arange(len(flat), dtype=np.int64), sizes)
    present = classes != NO_ATOM
    return classes[present], numbers[present]


def _holdings(classes: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (parameter dim, class) pair of :func:`_all_terms` once: the dim's number and
    the class."""
    stride = int(classes.max()) + 1 if classes.size else 1
    pairs = distinct(numbers * stride + classes)
    return pairs // stride, pairs % stride


def _by_first_appearance(classes: np.ndarray, bound: int) -> np.ndarray:
    """Every class of :func:`_all_terms` (all below ``bound``) once, in the order it first
    appears (dims in order, then positions)."""
    unique, first = first_occurrences(classes, bound)
    return unique[np.argsort(first)]


def _signatures(
    classes: np.ndarray, dims: np.ndarray, count: int, bound: int
) -> tuple[Callable[[int], list[int]], Callable[[np.ndarray], np.ndarray]]:
    """For a class, the parameter dims holding it (``members_of``); for classes, a 64-bit hash
    of that set each (random weight per dim, summed), so classes can be grouped by it.
    ``classes[i]`` (below ``bound``) is held by dim ``dims[i]``, each pair once, the pairs in
    ascending order of dim."""
    weights = np.random.default_rng(0).integers(1, 2**62, size=max(count, 1), dtype=np.int64)
    sums = np.zeros(bound, np.uint64)
    np.add.at(sums, classes, weights[dims].astype(np.uint64))
    sorted_dims = dims[np.argsort(classes, kind="stable")]  # by class, each class's dims ascending
    ends = np.cumsum(np.bincount(classes, minlength=bound))

    def members_of(cls: int) -> list[int]:
        return sorted_dims[ends[cls - 1] if cls else 0 : ends[cls]].tolist()

    def signature_of(of: np.ndarray) -> np.ndarray:
        return sums[of]

    return members_of, signature_of


def _size_argument_breaks(check: SizeCheck, got: int, expected: int) -> str:
    return (
        f"size argument `{describe(check.expr)}` in {check.where} would give {got} where "
        f"{expected} positions remain after pruning"
    )


def _perturbations(classes: np.ndarray) -> list[np.ndarray]:
    if classes.size <= 1:
        return [classes]
    return [classes[:1], classes[-1:], classes[::2]]
