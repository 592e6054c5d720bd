"""Atoms: the identities of individual channel positions, and how they are coupled.

Every position of every tensor dimension that can carry channel identity is described by a *term*:
a tuple of atoms (one per factor, e.g. ``(head, offset)`` for a position inside ``heads x head_dim``).
A position is removed exactly when any atom of its term is removed. Atoms that must be removed
together are merged in a union-find; an atom can also be *defined* as a product of other atoms,
which is how reshapes refine a flat channel dimension into factors.

The union-find lives in numpy arrays and merges whole columns of atoms at once, so tracing an
LLM with hundreds of thousands of channel positions stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_ATOM = -1


@dataclass
class Family:
    """A batch of atoms created together: one parameter dimension, or one fresh factor."""

    kind: str  # "param" or "fresh"
    description: str
    start: int
    size: int


class AtomTable:
    """Union-find over atoms with product definitions and frozen / mixing reasons per class."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, np.int64)
        self._family = np.zeros(1024, np.int64)
        self._flag = np.zeros(1024, bool)
        self._defined = np.zeros(1024, bool)
        self._size = 0
        self.families: list[Family] = []
        self.definition: dict[int, tuple[int, ...]] = {}
        self.frozen: dict[int, str] = {}
        self.mixing: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return self._size

    @property
    def family_of(self) -> np.ndarray:
        return self._family[: self._size]

    def new_family(self, size: int, kind: str, description: str) -> np.ndarray:
        """Create ``size`` fresh atoms in one family and return their ids."""
        start = self._size
        end = start + size
        if end > self._parent.size:
            capacity = max(end, 2 * self._parent.size)
            self._parent = np.resize(self._parent, capacity)
            self._family = np.resize(self._family, capacity)
            self._flag = np.resize(self._flag, capacity)
            self._defined = np.resize(self._defined, capacity)
        atoms = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = atoms
        self._family[start:end] = len(self.families)
        self._flag[start:end] = False
        self._defined[start:end] = False
        self.families.append(Family(kind, description, start, size))
        self._size = end
        return atoms

    # ------------------------------------------------------------------------ union-find

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = int(parent[root])
        while parent[atom] != root:
            parent[atom], atom = root, int(parent[atom])
        return root

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        """Vectorised ``find`` (with path compression) that keeps ``NO_ATOM`` entries."""
        atoms = np.asarray(atoms, dtype=np.int64)
        valid = atoms != NO_ATOM
        if valid.all():
            return self._roots(atoms)
        out = atoms.copy()
        out[valid] = self._roots(atoms[valid])
        return out

    def _roots(self, atoms: np.ndarray) -> np.ndarray:
        parent = self._parent
        current = parent[atoms]
        while True:
            nxt = parent[current]
            if np.array_equal(nxt, current):
                break
            current = nxt
        parent[atoms] = current
        return current

    def union_many(self, xs: np.ndarray, ys: np.ndarray) -> None:
        """Merge the classes of ``xs[i]`` and ``ys[i]`` for every ``i``.

        Pairs whose classes carry product definitions go one by one through :meth:`union`;
        the rest are linked in bulk, then frozen and mixing marks move to the new roots.
        """
        xs = np.asarray(xs, np.int64)
        ys = np.asarray(ys, np.int64)
        while xs.size:
            rx, ry = self._roots(xs), self._roots(ys)
            differ = rx != ry
            if not differ.any():
                return
            xs, ys, rx, ry = xs[differ], ys[differ], rx[differ], ry[differ]
            defined = self._defined[rx] | self._defined[ry]
            for a, b in zip(rx[defined], ry[defined]):
                self.union(int(a), int(b))
            hi, first = np.unique(np.maximum(rx[~defined], ry[~defined]), return_index=True)
            self._parent[hi] = np.minimum(rx[~defined], ry[~defined])[first]
            marked = hi[self._flag[hi]]
            if marked.size:
                for old, new in zip(marked.tolist(), self._roots(marked).tolist()):
                    self._move_marks(old, new)
            xs, ys = xs[~defined], ys[~defined]

    def _move_marks(self, old: int, new: int) -> None:
        self._flag[new] = True
        if old in self.frozen:
            self.frozen.setdefault(new, self.frozen.pop(old))
        if old in self.mixing:
            self.mixing.setdefault(new, set()).update(self.mixing.pop(old))

    def union(self, a: int, b: int) -> None:
        """Merge two atom classes; their definitions must then agree factor by factor."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        if self._flag[rb]:
            self._move_marks(rb, ra)
        def_b = self.definition.pop(rb, None)
        if def_b is None:
            return
        self._defined[rb] = False
        def_a = self.definition.get(ra)
        if def_a is None:
            self.definition[ra] = def_b
            self._defined[ra] = True
            self._propagate(ra)
        else:
            self.unify_terms(def_a, def_b)

    # ----------------------------------------------------------------------- definitions

    def unify_terms(self, term_a: tuple[int, ...], term_b: tuple[int, ...]) -> None:
        """Make two product terms equal: factor-wise when they have the same arity, else freeze."""
        exp_a, exp_b = self.expand(term_a), self.expand(term_b)
        if len(exp_a) == len(exp_b):
            for x, y in zip(exp_a, exp_b):
                self.union(x, y)
            return
        for atom in exp_a + exp_b:
            self.freeze(atom, "two incompatible factorisations of the same channels")

    def define(self, atom: int, term: tuple[int, ...]) -> None:
        """Declare ``atom`` to be the product of ``term``'s atoms."""
        root = self.find(atom)
        expanded = self.expand(term)
        if root in expanded:
            self.freeze(root, "a channel defined in terms of itself")
            return
        existing = self.definition.get(root)
        if existing is None:
            self.definition[root] = expanded
            self._flag[root] = True
            self._defined[root] = True
            self._propagate(root)
        else:
            self.unify_terms(existing, expanded)

    def _propagate(self, root: int) -> None:
        """A class that became a product passes its frozen and mixing marks to its factors."""
        for part in self.definition[root]:
            if root in self.frozen:
                self.freeze(part, self.frozen[root])
            for reason in self.mixing.get(root, ()):
                self._mark(self.find(part), reason)

    def expand(self, term: tuple[int, ...]) -> tuple[int, ...]:
        """Replace defined atoms by their factors, recursively, returning class roots."""
        out: list[int] = []
        stack = list(reversed(term))
        steps = 0
        while stack:
            steps += 1
            if steps > 1_000_000:
                raise RuntimeError("cyclic channel definition")
            atom = stack.pop()
            if atom == NO_ATOM:
                continue
            root = self.find(atom)
            parts = self.definition.get(root)
            if parts is None:
                out.append(root)
            else:
                stack.extend(reversed(parts))
        return tuple(out)

    def expand_rows(self, atoms: np.ndarray) -> np.ndarray:
        """Expand a ``[n, k]`` atom array into a ``[n, p]`` array of primitive class roots
        (each row's factors left-aligned, ``NO_ATOM`` padded)."""
        n = atoms.shape[0]
        if atoms.shape[1] == 0:
            return np.zeros((n, 0), np.int64)
        roots = self.roots(atoms)
        if not self.definition:
            return roots
        columns = [self._expand_column(column) for column in roots.T]
        return _left_aligned(np.concatenate(columns, axis=1))

    def _expand_column(self, column: np.ndarray) -> np.ndarray:
        """Expand one column of class roots, one unique value at a time."""
        valid = column != NO_ATOM
        if not self._defined[column[valid]].any():
            return column[:, None]
        values, inverse = np.unique(column, return_inverse=True)
        parts = [self.definition.get(int(v), (int(v),)) if v != NO_ATOM else () for v in values]
        table = np.full((len(values), max(len(p) for p in parts)), NO_ATOM, np.int64)
        for i, part in enumerate(parts):
            table[i, : len(part)] = part
        expanded = [self._expand_column(self.roots(c)) for c in table.T]
        return np.concatenate(expanded, axis=1)[inverse.reshape(-1)]

    # ------------------------------------------------------------------- frozen, mixing

    def freeze(self, atom: int, reason: str) -> None:
        """Mark an atom class as not removable, keeping the first reason given."""
        if atom == NO_ATOM:
            return
        root = self.find(atom)
        if root in self.frozen:
            return
        self.frozen[root] = reason
        self._flag[root] = True
        for part in self.definition.get(root, ()):
            self.freeze(part, reason)

    def freeze_many(self, atoms: np.ndarray, reason: str) -> None:
        atoms = np.asarray(atoms, np.int64).reshape(-1)
        atoms = atoms[atoms != NO_ATOM]
        for root in np.unique(self._roots(atoms)) if atoms.size else ():
            self.freeze(int(root), reason)

    def mark_mixing(self, atoms: np.ndarray, reason: str) -> None:
        """Record that these classes pass through an op that mixes channels (e.g. LayerNorm)."""
        for atom in np.unique(self.expand_rows(np.asarray(atoms).reshape(-1, 1))):
            if atom != NO_ATOM:
                self._mark(int(atom), reason)

    def _mark(self, root: int, reason: str) -> None:
        self.mixing.setdefault(root, set()).add(reason)
        self._flag[root] = True


def _left_aligned(rows: np.ndarray) -> np.ndarray:
    """Move each row's atoms to the front (keeping their order) and drop empty columns."""
    order = np.argsort(rows == NO_ATOM, axis=1, kind="stable")
    rows = np.take_along_axis(rows, order, axis=1)
    width = int((rows != NO_ATOM).sum(axis=1).max(initial=0))
    return rows[:, : max(width, 1)] if rows.shape[1] else rows
