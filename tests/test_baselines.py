"""The published methods re-implemented as baselines: documented behaviour on small masks."""
import numpy as np
import pytest
import scipy.sparse as sp

from regroup import from_array, regroup_pattern
from regroup.partitioners.dsb import dsb
from regroup.structure_lth import UBFACTOR_EPSILON, _part_block, structure_lth


def test_dsb_concatenates_clusters_largest_first():
    # Three row groups with disjoint columns: sizes 6 (A), 2 (C), 4 (B), interleaved.
    X = np.zeros((12, 12))
    groups = {"A": [0, 3, 5, 7, 9, 11], "B": [1, 4, 8, 10], "C": [2, 6]}
    for cols, rows in zip((range(0, 4), range(4, 8), range(8, 12)), groups.values()):
        X[np.ix_(rows, list(cols))] = 1
    perm = dsb(sp.csr_matrix(X), 4)
    assert perm.tolist() == groups["A"] + groups["B"] + groups["C"]


def test_dsb_is_a_registered_shuffled_baseline():
    rng = np.random.default_rng(0)
    pat = from_array(rng.random((64, 48)) < 0.1)
    r = regroup_pattern(pat, block=16, format="shuffled", method="dsb")
    assert r.metrics["chosen"] == "dsb" and not r.metrics["refined"]


def test_lth_block_widens_until_width_exceeds_1_5x_uncovered():
    # Column use in the part: col0 by 4 rows, col1 by 3, col2 by 2, col3 by 1 (row 0).
    rows = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    B = sp.csr_matrix(rows.astype(float))
    # width 1: max uncovered 3 (1 > 4.5 no); 2: 2 (2 > 3 no); 3: 1 (3 > 1.5 yes)
    assert _part_block(B, np.arange(4), 1.5).tolist() == [0, 1, 2]
    assert _part_block(B, np.arange(4), 0.5).tolist() == [0, 1]


def test_lth_epsilon_matches_ubfactor_10_over_three_bisections():
    assert UBFACTOR_EPSILON == pytest.approx(0.728)


def test_lth_small_parts_get_no_block():
    pytest.importorskip("kahypar")
    rng = np.random.default_rng(0)
    pat = from_array(rng.random((64, 64)) < 0.2)       # 8 parts of ~8 rows: all <= 16
    out = structure_lth(pat)
    assert out.area == 0 and out.retained == 0.0 and out.blocks == []


def test_lth_finds_planted_parts():
    pytest.importorskip("kahypar")
    rng = np.random.default_rng(1)
    n_groups, rows_per, cols_per = 8, 24, 20
    X = np.zeros((n_groups * rows_per, n_groups * cols_per), bool)
    for g in range(n_groups):
        X[g * rows_per:(g + 1) * rows_per, g * cols_per:(g + 1) * cols_per] = \
            rng.random((rows_per, cols_per)) < 0.6
    hidden = rng.permutation(len(X))
    out = structure_lth(from_array(X[hidden]))
    truth = {frozenset(np.flatnonzero(hidden // rows_per == g).tolist())
             for g in range(n_groups)}
    found = {frozenset(np.flatnonzero(out.labels == p).tolist()) for p in range(n_groups)}
    assert found == truth
    # Each block stops widening once its width exceeds 1.5x the rows' uncovered nonzeros,
    # before covering all 20 columns of its group: the method drops part of every row.
    assert all(c.size < cols_per for _, c in out.blocks)
    assert 0.5 < out.retained < 1.0
    assert out.kernel_blocks == sum(-(-r.size // 32) for r, _ in out.blocks)
    assert out.mask.sum() == out.area == sum(r.size * c.size for r, c in out.blocks)
