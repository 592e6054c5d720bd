"""The sort- and scatter-based set operations the analysis uses give NumPy's answers."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.spaces.integers import any_common, distinct, distinct_rows, first_occurrences

values = st.lists(st.integers(-1, 40), max_size=60).map(lambda v: np.array(v, np.int64))


@settings(max_examples=200, deadline=None)
@given(values)
def test_distinct_and_first_occurrences_agree_with_np_unique(array):
    assert np.array_equal(distinct(array), np.unique(array))
    unique, first = np.unique(array, return_index=True)
    for bound in (None, 64):
        if bound is not None and array.size and array.min() < 0:
            continue  # the scatter takes values in [0, bound)
        got_unique, got_first = first_occurrences(array, bound)
        assert np.array_equal(got_unique, unique) and np.array_equal(got_first, first)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda k: st.lists(st.lists(st.integers(-1, 4), min_size=k, max_size=k), max_size=30)
    )
)
def test_distinct_rows_are_np_uniques_rows_in_the_same_order(rows):
    array = np.array(rows, np.int64).reshape(len(rows), -1 if rows else 2)
    assert np.array_equal(distinct_rows(array), np.unique(array, axis=0))


@settings(max_examples=200, deadline=None)
@given(values, values)
def test_any_common_is_isin_any(a, b):
    assert any_common(a, b) == bool(np.isin(a, b).any())


def test_first_occurrences_by_scatter_skips_values_never_seen():
    unique, first = first_occurrences(np.array([5, 2, 5, 0, 2]), bound=8)
    assert unique.tolist() == [0, 2, 5] and first.tolist() == [3, 1, 0]
