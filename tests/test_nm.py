"""N:M with column permutations: masks, the exact swap gains, the searches against the
exact optimum, hostile inputs."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regroup import RegroupError
from regroup import nm as nmod
from regroup.nm import (asp_search, check_nm, efficacy, nm_mask, nm_optimum, nm_retained,
                        nm_search, nm_values, row_topk_retained)

NMS = [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2)]


def _scores(seed: int, rows: int, cols: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = np.abs(rng.standard_normal((rows, cols)))
    return np.round(A, 1) if ties else A


def _brute(A: np.ndarray, n: int, m: int, perm: np.ndarray) -> float:
    """Kept mass, the slow way: row by row, group by group."""
    total = 0.0
    for row in A[:, perm]:
        for g in range(0, len(perm), m):
            total += sum(sorted(row[g:g + m], reverse=True)[:n])
    return total


@pytest.mark.parametrize("value,want", [("2:4", (2, 4)), ((1, 4), (1, 4)), (" 4 : 8", (4, 8)),
                                        ([2, 8], (2, 8))])
def test_check_nm_reads_pairs_and_strings(value, want):
    assert check_nm(value, "f") == want


@pytest.mark.parametrize("value,exc", [("2-4", ValueError), ("4:4", ValueError),
                                       ((0, 4), ValueError), ((5, 4), ValueError),
                                       ((2, 4.0), TypeError), (24, TypeError),
                                       ((True, 4), TypeError), ((2, 65), ValueError)])
def test_check_nm_refuses_and_names_the_parameter(value, exc):
    with pytest.raises(exc, match="'nm' parameter of caller"):
        check_nm(value, "caller")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), nm=st.sampled_from(NMS), groups=st.integers(1, 6),
       rows=st.integers(1, 7), ties=st.booleans())
def test_mask_keeps_exactly_n_per_group_and_its_mass(seed, nm, groups, rows, ties):
    n, m = nm
    A = _scores(seed, rows, groups * m, ties)
    perm = np.random.default_rng(seed).permutation(groups * m)
    mask = nm_mask(A, nm, perm)
    assert (mask[:, perm].reshape(rows, groups, m).sum(-1) == n).all()
    kept = mask[:, perm].reshape(rows, groups, m)
    vals = A[:, perm].reshape(rows, groups, m)
    # nothing dropped is larger than something kept in its group
    assert (np.where(kept, vals, np.inf).min(-1) >= np.where(kept, -np.inf, vals).max(-1)).all()
    assert np.isclose((A * mask).sum(), nm_retained(A, nm, perm))
    assert np.isclose(nm_retained(A, nm, perm), _brute(A, n, m, perm))
    assert nm_values(A, nm, perm).shape == (rows, groups)


def test_swap_gains_are_exact():
    """Every entry of the all-pairs swap gain equals the change of the objective when the
    two columns are swapped (checked against recomputation, several N:M)."""
    for seed, (n, m) in enumerate([(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)]):
        A = _scores(seed, 9, 4 * m, ties=seed % 2 == 1)
        perm = np.random.default_rng(seed).permutation(4 * m)
        state = nmod._SwapState(A, perm, n, m)
        D = state.deltas()
        base = _brute(A, n, m, perm)
        for i, j in itertools.combinations(range(4 * m), 2):
            if i // m == j // m:
                assert D[i, j] == -np.inf
                continue
            p = perm.copy()
            p[i], p[j] = p[j], p[i]
            assert abs(D[i, j] - (_brute(A, n, m, p) - base)) < 1e-4, (n, m, i, j)


def test_cycle_gains_are_exact_and_moves_update_exactly():
    """A 3-cycle of positions in three groups gains the sum of its replacement gains, and
    the state after the move is the state built from scratch (several N:M)."""
    for seed, (n, m) in enumerate([(2, 4), (1, 4), (4, 8), (1, 2)]):
        rng = np.random.default_rng(seed)
        A = _scores(seed, 9, 5 * m, ties=seed % 2 == 1)
        perm = rng.permutation(5 * m)
        state = nmod._SwapState(A, perm, n, m)
        R = state.replace_gains()
        base = _brute(A, n, m, perm)
        for _ in range(40):
            g = rng.choice(5, 3, replace=False) * m + rng.integers(m, size=3)
            i, k, j = g
            p = perm.copy()
            p[[i, k, j]] = perm[[k, j, i]]
            want = _brute(A, n, m, p) - base
            assert abs(R[i, k] + R[k, j] + R[j, i] - want) < 1e-4, (n, m, i, k, j)
            assert abs(state.exact_move_gain(g, g[[1, 2, 0]]) - want) < 1e-9
        state.move(g, g[[1, 2, 0]])
        fresh = nmod._SwapState(A, p, n, m)
        assert np.array_equal(state.perm, p)
        assert np.isclose(state.total(), _brute(A, n, m, p))
        assert np.allclose(state.replace_gains(), fresh.replace_gains(), atol=1e-4)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)])
def test_search_ends_where_no_swap_or_three_cycle_gains(nm):
    """On matrices narrower than the cycle fanout every 3-cycle is scored: the order
    nm_search returns is a local optimum for every swap and every 3-cycle."""
    for seed in range(3):
        A = _scores(seed, 12, 32)
        r = nm_search(A, nm, seed=seed)
        assert r.retained > r.plain
        state = nmod._SwapState(A, r.col_perm, *nm)
        R = state.replace_gains().astype(np.float64)
        cycles = R[:, :, None] + R[None, :, :] + R.T[:, None, :]     # [i, k, j]
        assert np.nanmax(np.where(np.isfinite(cycles), cycles, np.nan)) < 1e-4
        assert state.deltas().max() < 1e-4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), nm=st.sampled_from([(2, 4), (1, 4), (2, 8)]),
       groups=st.integers(1, 8), rows=st.integers(1, 12), pattern=st.booleans())
def test_search_never_loses_and_returns_a_bijection(seed, nm, groups, rows, pattern):
    A = _scores(seed, rows, groups * nm[1])
    if pattern:                                   # the count objective: a 0/1 pattern
        A = (A > 0.8).astype(float)
    for search in (nm_search, asp_search) if nm[1] <= 4 else (nm_search,):
        r = search(A, nm, seed=seed)
        assert sorted(r.col_perm.tolist()) == list(range(A.shape[1]))
        assert r.retained >= r.plain - 1e-9
        assert np.isclose(r.retained, nm_retained(A, nm, r.col_perm))
        assert np.isclose(r.plain, nm_retained(A, nm))
        assert r.retained <= row_topk_retained(A, nm) + 1e-9


def test_search_is_deterministic_for_a_seed():
    A = _scores(3, 40, 64)
    a, b = nm_search(A, (2, 4), seed=7), nm_search(A, (2, 4), seed=7)
    assert np.array_equal(a.col_perm, b.col_perm) and a.retained == b.retained
    # kicks (off by default) draw from the seed: same seed, same order; never worse
    # than the climb they start from, and what they report is what the order keeps
    k1, k2 = (nm_search(A, (2, 4), seed=7, kicks=6, kick_swaps=3) for _ in range(2))
    assert np.array_equal(k1.col_perm, k2.col_perm)
    assert k1.stats["kicks"] == 6 and k1.retained >= a.retained - 1e-9
    assert np.isclose(k1.retained, nm_retained(A, (2, 4), k1.col_perm))
    c, d = asp_search(A, (2, 4), seed=7), asp_search(A, (2, 4), seed=7)
    assert np.array_equal(c.col_perm, d.col_perm)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4)])
def test_two_groups_are_solved_exactly(nm):
    """With two groups the pair move enumerates every split: both searches are exact."""
    for seed in range(5):
        A = _scores(seed, 20, 8, ties=seed == 4)
        best = nm_optimum(A, nm)
        assert np.isclose(nm_search(A, nm, seed=seed).retained, best.retained)
        assert np.isclose(asp_search(A, nm, seed=seed).retained, best.retained)


def test_optimum_bounds_the_searches_on_small_cases():
    gaps = []
    for seed in range(6):
        A = _scores(seed, 24, 16)
        best = nm_optimum(A, (2, 4))
        # the optimum is a permutation whose N:M mass is what it says
        assert np.isclose(best.retained, nm_retained(A, (2, 4), best.col_perm))
        r = nm_search(A, (2, 4), seed=seed)
        assert best.plain - 1e-9 <= r.retained <= best.retained + 1e-9
        gaps.append((r.retained - r.plain) / max(best.retained - best.plain, 1e-12))
    assert np.mean(gaps) >= 0.95, gaps


def test_efficacy():
    assert efficacy(5.0, 4.0, 6.0) == 0.5
    assert np.isnan(efficacy(4.0, 4.0, 4.0))


@pytest.mark.parametrize("A,match", [
    (np.ones((3, 6)), "divisible by 4"),
    (np.ones((3, 4, 1)), "2-D"),
    (np.array([[1.0, np.nan, 0, 0]]), "NaN"),
    (np.array([["a", "b", "c", "d"]]), "2-D"),
    (np.ones((0, 4)), "divisible"),
])
def test_hostile_inputs_are_refused(A, match):
    for f in (nm_mask, nm_retained, nm_search, asp_search):
        with pytest.raises(RegroupError, match=match):
            f(A, (2, 4))


def test_bad_permutations_are_refused():
    A = _scores(0, 3, 8)
    for perm in (np.zeros(8, int), np.arange(7), np.arange(8) + 1, np.arange(8.0)):
        with pytest.raises(RegroupError, match="permutation of 8 columns"):
            nm_mask(A, (2, 4), perm)


def test_asp_refuses_wide_groups():
    with pytest.raises(RegroupError, match="M <= 4"):
        asp_search(_scores(0, 4, 16), (4, 8))


def test_optimum_refuses_large_cases():
    with pytest.raises(RegroupError, match="max_subsets"):
        nm_optimum(_scores(0, 4, 64), (2, 4), max_subsets=1000)


@pytest.mark.parametrize("nm", [(2, 4), (1, 3)])
def test_wide_matrices_are_searched_window_by_window(monkeypatch, nm):
    monkeypatch.setattr(nmod, "_WINDOW_COLS", 16)
    A = _scores(5, 10, 48)
    r = nm_search(A, nm, seed=0)
    window = 16 // nm[1] * nm[1]
    assert r.stats["windows"] == -(-48 // window)
    # columns stay in their window, and the search still never loses
    assert (r.col_perm // window == np.arange(48) // window).all()
    assert r.retained >= r.plain and np.isclose(r.retained, nm_retained(A, nm, r.col_perm))
