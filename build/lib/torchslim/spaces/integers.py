"""Set operations on 1-D arrays of integers (atom ids, positions) at sort or scatter speed.

NumPy 2's ``np.unique`` hashes when it is asked for the values alone, and sorts stably when
asked for first indices: on the arrays a graph's analysis handles (a thousand to a few hundred
thousand atom ids) both are several times slower than a plain sort (distinct values) or a
scatter over the ids' range (first occurrences), which give the same answers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D array, ascending (``np.unique(values)``)."""
    ordered = np.sort(np.asarray(values).reshape(-1))
    if ordered.size < 2:
        return ordered
    leading = np.empty(ordered.size, bool)
    leading[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=leading[1:])
    return ordered[leading]


def first_occurrences(
    values: np.ndarray, bound: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a 1-D integer array, ascending, and the index of each one's
    first occurrence (``np.unique(values, return_index=True)``). Given ``bound`` (all values
    in ``[0, bound)``, and ``bound`` not far above the array's length), by a scatter over that
    range; else by a stable sort."""
    values = np.asarray(values, np.int64).reshape(-1)
    if bound is not None and bound <= 8 * values.size:
        first = np.full(bound, values.size, np.int64)
        np.minimum.at(first, values, np.arange(values.size, dtype=np.int64))
        present = np.nonzero(first < values.size)[0]
        return present, first[present]
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    leading = np.empty(ordered.size, bool)
    leading[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=leading[1:])
    return ordered[leading], order[leading]


def distinct_rows(rows: np.ndarray) -> np.ndarray:
    """The distinct rows of a 2-D integer array, in lexicographic order
    (``np.unique(rows, axis=0)``)."""
    rows = np.asarray(rows)
    if len(rows) < 2:
        return rows.copy()
    ordered = rows[np.lexsort(rows.T[::-1])]
    leading = np.empty(len(ordered), bool)
    leading[0] = True
    np.any(ordered[1:] != ordered[:-1], axis=1, out=leading[1:])
    return ordered[leading]


def any_common(values: np.ndarray, others: np.ndarray) -> bool:
    """Whether any of ``values`` is among ``others`` (``np.isin(values, others).any()``)."""
    others = distinct(others)
    values = np.asarray(values).reshape(-1)
    if not others.size or not values.size:
        return False
    slot = np.minimum(np.searchsorted(others, values), others.size - 1)
    return bool((others[slot] == values).any())
