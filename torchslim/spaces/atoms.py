"""Atoms: the identities of individual channel positions, and how they are coupled.

Every position of every tensor dimension that can carry channel identity is described by a *term*:
a tuple of atoms (one per factor, e.g. ``(head, offset)`` for a position inside ``heads x head_dim``).
A position is removed exactly when any atom of its term is removed. Atoms that must be removed
together are merged in a union-find; an atom can also be *defined* as a product of other atoms,
which is how reshapes refine a flat channel dimension into factors.

The union-find and the definitions live in numpy arrays, and whole columns of atoms are merged,
defined and expanded at once, so tracing an LLM with hundreds of thousands of channel positions
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torchslim.spaces.integers import any_common, distinct, first_occurrences

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
        self._ever_defined = False  # no class was ever a product: nothing to expand
        self._parts = np.full((1024, 2), NO_ATOM, np.int64)  # row r: the factors r is defined as
        self._size = 0
        self.families: list[Family] = []
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
            parts = np.full((capacity, self._parts.shape[1]), NO_ATOM, np.int64)
            parts[:start] = self._parts[:start]
            self._parts = parts
        atoms = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = atoms
        self._family[start:end] = len(self.families)
        self._flag[start:end] = False
        self._defined[start:end] = False
        self._parts[start:end] = NO_ATOM
        self.families.append(Family(kind, description, start, size))
        self._size = end
        return atoms

    def defined_atoms(self) -> np.ndarray:
        """The class roots that are defined as products of other atoms."""
        return np.flatnonzero(self._defined[: self._size])

    def definition(self, root: int) -> tuple[int, ...] | None:
        """The factors ``root`` is defined as (``None``: a primitive class)."""
        if not self._defined[root]:
            return None
        return tuple(int(p) for p in self._parts[root] if p != NO_ATOM)

    def _set_definition(self, roots: np.ndarray, parts: np.ndarray) -> None:
        width = parts.shape[1]
        if width > self._parts.shape[1]:
            extra = np.full((self._parts.shape[0], width - self._parts.shape[1]), NO_ATOM)
            self._parts = np.concatenate([self._parts, extra], axis=1)
        self._parts[roots] = NO_ATOM
        self._parts[roots, :width] = parts
        self._defined[roots] = True
        self._ever_defined = True
        self._flag[roots] = True

    def _clear_definition(self, root: int) -> None:
        self._defined[root] = False
        self._parts[root] = NO_ATOM

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
        if not atoms.size or atoms.min() >= 0:
            return self._roots(atoms)
        valid = atoms != NO_ATOM
        out = atoms.copy()
        out[valid] = self._roots(atoms[valid])
        return out

    def _roots(self, atoms: np.ndarray) -> np.ndarray:
        parent = self._parent
        current = parent[atoms]
        while True:
            nxt = parent[current]
            if not (nxt != current).any():
                break
            current = nxt
        parent[atoms] = current
        return current

    def union_many(self, xs: np.ndarray, ys: np.ndarray, are_roots: bool = False) -> None:
        """Merge the classes of ``xs[i]`` and ``ys[i]`` for every ``i`` (``are_roots``: the
        caller knows both are class roots already).

        Pairs whose classes carry product definitions go one by one through :meth:`union`;
        the rest are linked in bulk (after those, from their roots then), then frozen and
        mixing marks move to the new roots. A root linked twice in one pass (its other pairs)
        waits for the next pass.
        """
        xs = np.asarray(xs, np.int64)
        ys = np.asarray(ys, np.int64)
        while xs.size:
            rx, ry = (xs, ys) if are_roots else (self._roots(xs), self._roots(ys))
            are_roots = False
            differ = rx != ry
            if not differ.all():
                if not differ.any():
                    return
                xs, ys, rx, ry = xs[differ], ys[differ], rx[differ], ry[differ]
            defined = (self._defined[rx] | self._defined[ry]) if self._ever_defined else None
            any_defined = defined is not None and bool(defined.any())
            if any_defined:
                for a, b in zip(rx[defined], ry[defined]):
                    self.union(int(a), int(b))
                plain = ~defined
                xs, ys = xs[plain], ys[plain]
                continue  # those unions may have moved the other pairs' roots: look again
            linked, under = np.maximum(rx, ry), np.minimum(rx, ry)
            if linked.size > 1 and not (linked[1:] > linked[:-1]).all():
                linked_once, first = first_occurrences(linked)
                hi, under = linked_once, under[first]
            else:  # ascending already (positions of a family in order): each once
                hi = linked
            self._parent[hi] = under
            marked = hi[self._flag[hi]]
            if marked.size:
                for old, new in zip(marked.tolist(), self._roots(marked).tolist()):
                    self._move_marks(old, new)
            if hi.size == linked.size:
                return

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
        def_b = self.definition(rb)
        if def_b is None:
            if self._defined[ra]:
                self._propagate(ra)  # marks rb brought reach ra's factors, as freeze() does
            return
        self._clear_definition(rb)
        def_a = self.definition(ra)
        if def_a is None:
            self._set_definition(np.array([ra]), np.array([def_b], np.int64).reshape(1, -1))
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
        existing = self.definition(root)
        if existing is None:
            self._set_definition(np.array([root]), np.array([expanded], np.int64).reshape(1, -1))
            self._propagate(root)
        else:
            self.unify_terms(existing, expanded)

    def define_many(self, atoms: np.ndarray, terms: np.ndarray) -> None:
        """``define(atoms[i], terms[i])`` for every row (``NO_ATOM`` pads a term), in order.

        Rows that cannot interact (distinct plain classes, none defined, frozen or mixing, none
        appearing in any row's factors, no empty term) are defined at once; otherwise the rows
        go one by one, so the result never depends on which path ran."""
        atoms = np.asarray(atoms, np.int64).reshape(-1)
        terms = np.asarray(terms, np.int64).reshape(atoms.size, -1)
        if not atoms.size:
            return
        roots = self._roots(atoms)
        expanded = self.expand_rows(terms)
        independent = (
            distinct(roots).size == roots.size
            and not (self._flag[roots] | self._defined[roots]).any()
            and (expanded != NO_ATOM).any(axis=1).all()
            and not any_common(roots, expanded)
        )
        if independent:
            self._set_definition(roots, expanded)
            return
        for atom, term in zip(atoms.tolist(), terms.tolist()):
            self.define(atom, tuple(t for t in term if t != NO_ATOM))

    def _propagate(self, root: int) -> None:
        """A class that became a product passes its frozen and mixing marks to its factors."""
        for part in self.definition(root) or ():
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
            parts = self.definition(root)
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
        if not self._ever_defined:
            return roots
        valid = roots != NO_ATOM
        if not self._defined[roots[valid]].any():
            return roots if valid.all() and len(roots) else _left_aligned(roots)
        columns = [self._expand_column(column) for column in roots.T]
        return _left_aligned(np.concatenate(columns, axis=1))

    def expand_many(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """``[self.expand_rows(a) for a in arrays]``, batched by width: one root lookup for all
        the arrays, which are their own expansion unless they hold a defined class or
        ``NO_ATOM``; those are expanded together (a row's expansion does not depend on the other
        rows), each then trimmed to its own widest row."""
        out: list[np.ndarray] = [np.zeros((0, 0), np.int64)] * len(arrays)
        by_width: dict[int, list[int]] = {}
        for i, atoms in enumerate(arrays):
            if atoms.shape[0] and atoms.shape[1]:
                by_width.setdefault(atoms.shape[1], []).append(i)
            else:
                out[i] = self.expand_rows(atoms)
        for indices in by_width.values():
            roots = self.roots(np.concatenate([arrays[i] for i in indices]))
            ends = np.cumsum([arrays[i].shape[0] for i in indices])
            starts = np.concatenate([[0], ends[:-1]])
            if self._ever_defined:
                valid = roots != NO_ATOM
                special = ~valid
                special[valid] = self._defined[roots[valid]]
                expand = np.logical_or.reduceat(special.any(axis=1), starts)
            else:  # every array is its roots, NO_ATOM in place
                expand = np.zeros(len(indices), bool)
            for k in np.flatnonzero(~expand).tolist():
                out[indices[k]] = roots[starts[k] : ends[k]].copy()
            chosen = np.flatnonzero(expand).tolist()
            if not chosen:
                continue
            pieces = [roots[starts[k] : ends[k]] for k in chosen]
            joint = self.expand_rows(np.concatenate(pieces))
            widths = (joint != NO_ATOM).sum(axis=1)
            lo = 0
            for k, piece in zip(chosen, pieces):
                hi = lo + len(piece)
                out[indices[k]] = joint[lo:hi, : max(int(widths[lo:hi].max()), 1)].copy()
                lo = hi
        return out

    def _expand_column(self, column: np.ndarray) -> np.ndarray:
        """Expand one column of class roots: each defined class into its factors' columns."""
        valid = column != NO_ATOM
        defined = valid & self._defined[np.where(valid, column, 0)]
        if not defined.any():
            return column[:, None]
        table = np.full((len(column), self._parts.shape[1]), NO_ATOM, np.int64)
        table[defined] = self._parts[column[defined]]
        plain = valid & ~defined
        table[plain, 0] = column[plain]
        expanded = [self._expand_column(self.roots(c)) for c in table.T if (c != NO_ATOM).any()]
        return np.concatenate(expanded, axis=1)

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
        for part in self.definition(root) or ():
            self.freeze(part, reason)

    def freeze_many(self, atoms: np.ndarray, reason: str) -> None:
        atoms = np.asarray(atoms, np.int64).reshape(-1)
        atoms = atoms[atoms != NO_ATOM]
        if not atoms.size:
            return
        roots = distinct(self._roots(atoms))
        defined, frozen = self._defined, self.frozen
        for root in roots.tolist():  # as freeze(root) each, without a call per plain class
            if defined[root]:
                self.freeze(root, reason)
            elif root not in frozen:
                frozen[root] = reason
        self._flag[roots] = True

    def mark_mixing(self, atoms: np.ndarray, reason: str) -> None:
        """Record that these classes pass through an op that mixes channels (e.g. LayerNorm)."""
        for atom in distinct(self.expand_rows(np.asarray(atoms).reshape(-1, 1))):
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
