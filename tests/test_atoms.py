"""The atom table's bulk union gives the classes that one union per pair gives."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.spaces.atoms import AtomTable


def _partition(table: AtomTable) -> list[frozenset[int]]:
    classes: dict[int, set[int]] = {}
    for atom in range(len(table)):
        classes.setdefault(table.find(atom), set()).add(atom)
    return sorted(frozenset(c) for c in classes.values())


def _frozen_classes(table: AtomTable) -> set[frozenset[int]]:
    by_root = {table.find(a) for a in range(len(table)) if table.find(a) in table.frozen}
    return {frozenset(a for a in range(len(table)) if table.find(a) == r) for r in by_root}


def _table(size: int, defined: list[int], frozen: list[int]) -> AtomTable:
    table = AtomTable()
    table.new_family(size, "param", "atoms")
    factors = table.new_family(2, "fresh", "factors")
    for atom in defined:
        table.define(atom % size, (int(factors[0]), int(factors[1])))
    for atom in frozen:
        table.freeze(atom % size, f"frozen {atom % size}")
    return table


pairs = st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(pairs, st.lists(st.integers(0, 11), max_size=2), st.lists(st.integers(0, 11), max_size=3))
def test_union_many_merges_what_one_union_per_pair_merges(pairs, defined, frozen):
    bulk, single = _table(12, defined, frozen), _table(12, defined, frozen)
    xs = np.array([x for x, _ in pairs], np.int64)
    ys = np.array([y for _, y in pairs], np.int64)
    bulk.union_many(xs, ys)
    for x, y in pairs:
        single.union(x, y)
    assert _partition(bulk) == _partition(single)
    assert _frozen_classes(bulk) == _frozen_classes(single)


def test_a_defined_pair_merged_first_is_not_undone_by_a_plain_pair():
    table = AtomTable()
    q, d, p = (int(a) for a in table.new_family(3, "param", "atoms"))
    factors = table.new_family(2, "fresh", "factors")
    table.define(d, (int(factors[0]), int(factors[1])))
    # (d, p) merges through the definition, putting p under d; (p, q) must then join q to
    # that class, not relink p alone
    table.union_many(np.array([d, p]), np.array([p, q]))
    assert table.find(q) == table.find(d) == table.find(p)


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(8))), st.booleans())
def test_union_of_root_columns_matches_the_general_path(order, ascending):
    ys = np.array(sorted(order) if ascending else order, np.int64) + 8
    xs = np.arange(8, dtype=np.int64)
    known, general = AtomTable(), AtomTable()
    for table in (known, general):
        table.new_family(16, "param", "atoms")
    known.union_many(xs, ys, are_roots=True)
    general.union_many(xs, ys)
    assert _partition(known) == _partition(general)


terms = st.lists(st.lists(st.integers(-1, 13), min_size=0, max_size=6), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(terms, st.integers(1, 3), st.lists(st.integers(0, 11), max_size=3), st.booleans())
def test_expand_many_equals_one_expansion_per_array(sizes_and_atoms, width, defined, nested):
    table = _table(12, defined, [])
    if nested and defined:  # a factor that is itself a product
        inner = table.new_family(2, "fresh", "inner")
        table.define(12, (int(inner[0]), int(inner[1])))
    arrays = [  # widths 1..width: arrays of equal width are expanded together
        np.resize(np.array(atoms or [0], np.int64), (len(atoms), 1 + i % width))
        for i, atoms in enumerate(sizes_and_atoms)
    ]
    joint = table.expand_many(arrays)
    for atoms, got in zip(arrays, joint):
        expected = table.expand_rows(atoms)
        assert got.shape == expected.shape and (got == expected).all()
