"""Dimension layouts: which atoms each position of a tensor dimension is made of.

A :class:`DimLayout` holds an ``[n, k]`` array: row ``i`` is the term (product of atoms) of
position ``i``. ``k == 0`` means the dimension carries no channel identity (batch, spatial,
sequence, model inputs); its ``reason`` says why its size is fixed. The operations here are the
whole algebra the op rules need: products (merging dims), factorisations (splitting dims), direct
sums (concatenation), selection of rows, and unification of two layouts that must be equal.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from torchslim.spaces.atoms import NO_ATOM, AtomTable
from torchslim.spaces.integers import distinct, distinct_rows, first_occurrences


class DimLayout:
    """The atoms of one tensor dimension, position by position."""

    __slots__ = ("atoms", "reason", "__weakref__")

    def __init__(self, atoms: np.ndarray, reason: Optional[str] = None) -> None:
        self.atoms = atoms
        self.reason = reason

    @property
    def size(self) -> int:
        return self.atoms.shape[0]

    @property
    def is_opaque(self) -> bool:
        return self.atoms.shape[1] == 0

    def __repr__(self) -> str:
        return f"DimLayout(size={self.size}, factors={self.atoms.shape[1]})"


TensorLayout = list  # list[DimLayout], one per tensor dim


def opaque(size: int, reason: str) -> DimLayout:
    """A dimension whose size pruning never changes."""
    return DimLayout(np.zeros((size, 0), np.int64), reason)


def take(dim: DimLayout, index: np.ndarray) -> DimLayout:
    """Select positions (slicing, gathering, flipping)."""
    return DimLayout(dim.atoms[index], dim.reason)


def concat(dims: Sequence[DimLayout]) -> DimLayout:
    """Direct sum: positions of each part, one after another."""
    width = max(d.atoms.shape[1] for d in dims)
    parts = []
    for d in dims:
        pad = np.full((d.size, width - d.atoms.shape[1]), NO_ATOM, np.int64)
        parts.append(np.concatenate([d.atoms, pad], axis=1))
    reason = next((d.reason for d in dims if d.reason), None)
    return DimLayout(np.concatenate(parts, axis=0), reason)


def merge(dims: Sequence[DimLayout]) -> DimLayout:
    """Product: the row-major flattening of several dims into one."""
    if len(dims) == 1:
        return dims[0]
    atoms = np.zeros((1, 0), np.int64)
    for d in dims:
        n = atoms.shape[0]
        left = np.repeat(atoms, d.size, axis=0)
        right = np.tile(d.atoms, (n, 1))
        atoms = np.concatenate([left, right], axis=1)
    reason = next((d.reason for d in dims if d.reason), None)
    return DimLayout(_drop_redundant(atoms), reason)


def _drop_redundant(atoms: np.ndarray) -> np.ndarray:
    """Remove all-``NO_ATOM`` columns."""
    keep = [c for c in range(atoms.shape[1]) if (atoms[:, c] != NO_ATOM).any()]
    return atoms[:, keep] if len(keep) != atoms.shape[1] else atoms


def _varying_axes(grid: np.ndarray) -> list[int]:
    return [
        ax
        for ax in range(grid.ndim)
        if grid.shape[ax] > 1 and not np.all(grid == np.take(grid, [0], axis=ax))
    ]


def _coordinate_classes(sub: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Classes of coordinates along ``axis`` that must share an atom because a value repeats."""
    n = sub.shape[axis]
    if distinct(sub).size == sub.size:
        return np.arange(n), n
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    coords = np.indices(sub.shape)[axis]
    first: dict[int, int] = {}
    for value, coord in zip(sub.reshape(-1), coords.reshape(-1)):
        other = first.setdefault(int(value), int(coord))
        ra, rb = find(other), find(int(coord))
        parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    classes = distinct(roots)
    return np.searchsorted(classes, roots), classes.size


def split(table: AtomTable, dim: DimLayout, sizes: Sequence[int], where: str) -> list[DimLayout]:
    """Factorise one dim into ``sizes`` (row-major), refining atoms into products when needed."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return [dim]
    if math.prod(sizes) != dim.size:
        raise ValueError(f"cannot split a dim of size {dim.size} into {sizes}")
    expanded = table.expand_rows(dim.atoms)
    columns: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(expanded.shape[1]):
        grid = expanded[:, c].reshape(sizes)
        axes = _varying_axes(grid)
        if len(axes) <= 1:
            axis = axes[0] if axes else 0
            index = tuple(slice(None) if a == axis else 0 for a in range(len(sizes)))
            columns[axis].append(grid[index])
            continue
        index = tuple(slice(None) if a in axes else 0 for a in range(len(sizes)))
        sub = grid[index]
        if np.any(sub == NO_ATOM):
            table.freeze_many(sub[sub != NO_ATOM], f"reshape of mixed channel structure in {where}")
            continue
        fresh = []
        for pos, axis in enumerate(axes):
            labels, count = _coordinate_classes(sub, pos)
            atoms = table.new_family(count, "fresh", f"factor {axis} of a reshape in {where}")
            fresh.append(atoms[labels])
            columns[axis].append(atoms[labels])
        coords = np.indices(sub.shape).reshape(len(axes), -1)
        _, first = np.unique(sub.reshape(-1), return_index=True)
        first = np.sort(first)  # each value at its first position, in row-major order
        factors = np.stack([f[coords[k, first]] for k, f in enumerate(fresh)], axis=1)
        table.define_many(sub.reshape(-1)[first], factors)
    return [
        DimLayout(np.stack(cols, axis=1) if cols else np.zeros((s, 0), np.int64), dim.reason)
        for cols, s in zip(columns, sizes)
    ]


def _signature(col: np.ndarray) -> bytes:
    """Canonical partition of positions induced by a column."""
    values, first = first_occurrences(col)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[np.searchsorted(values, col)].tobytes()


def _live_columns(expanded: np.ndarray) -> list[np.ndarray]:
    return [
        expanded[:, c]
        for c in range(expanded.shape[1])
        if not (expanded[:, c] == expanded[0, c]).all()
    ]


def same_positions(table: AtomTable, a: DimLayout, b: DimLayout) -> bool:
    """Whether two dims hold the same channel terms, in any order."""
    rows_a = np.sort(table.expand_rows(a.atoms), axis=1)
    rows_b = np.sort(table.expand_rows(b.atoms), axis=1)
    if rows_a.shape != rows_b.shape:
        return False
    return np.array_equal(np.unique(rows_a, axis=0), np.unique(rows_b, axis=0))


def unify(table: AtomTable, a: DimLayout, b: DimLayout, where: str) -> None:
    """Require two dims to have identical positions (same channels, same order)."""
    if a.atoms is b.atoms or a.size != b.size or a.size == 0:
        return
    if a.atoms.shape == b.atoms.shape and (a.atoms == b.atoms).all():
        return
    cols_a = _live_columns(table.expand_rows(a.atoms))
    cols_b = _live_columns(table.expand_rows(b.atoms))
    if not cols_a and not cols_b:
        return
    if not cols_a or not cols_b:
        fixed, movable = (a, cols_b) if not cols_a else (b, cols_a)
        reason = f"coupled in {where} to a fixed-size dim ({fixed.reason or 'constant size'})"
        for col in movable:
            table.freeze_many(col, reason)
        return
    if len(cols_a) == 1 and len(cols_b) == 1:
        _union_columns(table, cols_a[0], cols_b[0], where, are_roots=True)
        return
    left_a: list[np.ndarray] = []
    left_b = list(cols_b)
    for col in cols_a:
        sig = _signature(col)
        match = next((j for j, other in enumerate(left_b) if _signature(other) == sig), None)
        if match is None:
            left_a.append(col)
        else:
            _union_columns(table, col, left_b.pop(match), where)
    if not left_a and not left_b:
        return
    if len(left_a) == 1 and left_b:
        _define_column(table, left_a[0], np.stack(left_b, axis=1), where)
    elif len(left_b) == 1 and left_a:
        _define_column(table, left_b[0], np.stack(left_a, axis=1), where)
    else:
        reason = f"incompatible reshapes of the same channels in {where}"
        for col in left_a + left_b:
            table.freeze_many(col, reason)


def _union_columns(
    table: AtomTable, x: np.ndarray, y: np.ndarray, where: str, are_roots: bool = False
) -> None:
    """Unify two columns position by position (``are_roots``: both hold class roots)."""
    differ = x != y
    x, y = x[differ], y[differ]
    loose = (x == NO_ATOM) | (y == NO_ATOM)
    if loose.any():
        table.freeze_many(
            np.maximum(x[loose], y[loose]), f"coupled in {where} to positions of fixed size"
        )
        x, y = x[~loose], y[~loose]
    table.union_many(x, y, are_roots)


def _define_column(table: AtomTable, col: np.ndarray, parts: np.ndarray, where: str) -> None:
    rows = distinct_rows(np.concatenate([col[:, None], parts], axis=1))
    reason = f"coupled in {where} to fixed positions"
    fixed = rows[:, 0] == NO_ATOM  # sorted first, as the rows below would be visited
    table.freeze_many(rows[fixed, 1:], reason)
    rows = rows[~fixed]
    if (rows[:, 1:] != NO_ATOM).any(axis=1).all():
        table.define_many(rows[:, 0], rows[:, 1:])
        return
    for row in rows:
        atom, term = int(row[0]), tuple(int(t) for t in row[1:] if t != NO_ATOM)
        if term:
            table.define(atom, term)
        else:
            table.freeze(atom, reason)
