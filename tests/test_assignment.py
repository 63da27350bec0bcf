"""Items to groups of fixed sizes: the cycle-cancelling solver is exact."""
from itertools import permutations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from regroup.assignment import assign, assign_greedy, group_sizes


def _total(values, perm, size):
    return values[perm, np.arange(perm.size) // size].sum()


def _optimum(values, size):
    """The same problem as a square assignment (items x slots), solved by scipy."""
    n = len(values)
    slots = np.repeat(np.arange(values.shape[1]), group_sizes(n, size))
    r, c = linear_sum_assignment(-values[:, slots])
    return values[r, slots[c]].sum()


def _check_order(perm, n):
    assert perm.dtype == np.intp
    assert sorted(perm.tolist()) == list(range(n))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 70), st.integers(1, 12), st.sampled_from(["int", "float", "sparse"]),
       st.booleans(), st.integers(0, 10**6))
def test_assign_reaches_the_assignment_optimum(n, size, kind, warm, seed):
    rng = np.random.default_rng(seed)
    size = min(size, n)
    k = len(group_sizes(n, size))
    if kind == "int":          # many ties
        values = rng.integers(0, 4, (n, k)).astype(float)
    elif kind == "float":
        values = rng.random((n, k)) * 10.0 ** rng.integers(-6, 6)
    else:                      # mostly zero rows, as pruned layers give
        values = rng.random((n, k)) * (rng.random((n, 1)) < 0.3)
    start = rng.permutation(n) if warm else None
    perm = assign(values, size, start=start)
    _check_order(perm, n)
    got, best = _total(values, perm, size), _optimum(values, size)
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert got >= _total(values, assign_greedy(values, size), size) - 1e-9
    if start is not None:
        assert got >= _total(values, start, size) - 1e-9
    again = assign(values, size, start=start)
    np.testing.assert_array_equal(again, perm)


@pytest.mark.parametrize("n,size", [(8, 3), (7, 2), (6, 4)])
def test_assign_matches_brute_force(n, size):
    rng = np.random.default_rng(n)
    k = len(group_sizes(n, size))
    values = rng.integers(0, 5, size=(n, k)).astype(float)
    slot_group = np.arange(n) // size
    best = max(values[list(p), slot_group].sum() for p in permutations(range(n)))
    assert _total(values, assign(values, size), size) == best


def test_group_sizes_and_single_group():
    assert group_sizes(10, 4).tolist() == [4, 4, 2]
    assert group_sizes(0, 4).tolist() == []
    values = np.array([[3.0], [1.0], [2.0]])
    np.testing.assert_array_equal(assign(values, 5), [0, 1, 2])


def test_each_group_lists_its_items_in_index_order():
    values = np.array([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    perm = assign(values, 2)
    np.testing.assert_array_equal(perm, [1, 3, 0, 2])


def test_one_group_is_canonical_and_non_finite_values_are_refused():
    values = np.ones((4, 1))
    np.testing.assert_array_equal(assign(values, 4, start=np.array([3, 1, 0, 2])),
                                  [0, 1, 2, 3])
    with pytest.raises(ValueError, match="'values' parameter of assign"):
        assign(np.array([[1.0, np.nan], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="'values' parameter of assign"):
        assign(np.ones(3), 1)
