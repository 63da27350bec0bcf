"""The published methods re-implemented as baselines: documented behaviour on small masks,
and DSB against its own scikit-learn call on real DLMC masks."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from regroup import from_array, regroup_pattern
from regroup.io import read_smtx
from regroup.partitioners.dsb import DSBDegenerateWarning, cosine_distance, dsb, dsb_clusters
from regroup.structure_lth import UBFACTOR_EPSILON, _part_block, structure_lth


def test_dsb_concatenates_clusters_largest_first():
    # Three row groups with disjoint columns: sizes 6 (A), 2 (C), 4 (B), interleaved.
    X = np.zeros((12, 12))
    groups = {"A": [0, 3, 5, 7, 9, 11], "B": [1, 4, 8, 10], "C": [2, 6]}
    for cols, rows in zip((range(0, 4), range(4, 8), range(8, 12)), groups.values()):
        X[np.ix_(rows, list(cols))] = 1
    perm = dsb(sp.csr_matrix(X), 4)
    assert perm.tolist() == groups["A"] + groups["B"] + groups["C"]


@pytest.mark.filterwarnings("ignore::regroup.partitioners.dsb.DSBDegenerateWarning")
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


# --- DSB against its own call: sklearn AgglomerativeClustering on the precomputed distance ---

# Small real masks: ties at distance 1.0 at the cut (the 0.95/0.98 ones) and none (0.8/0.9).
DLMC_SAMPLE = [
    "rn50/magnitude_pruning/0.8/bottleneck_2_block_group1_1_1.smtx",
    "rn50/magnitude_pruning/0.9/bottleneck_2_block_group3_5_1.smtx",
    "rn50/magnitude_pruning/0.98/bottleneck_2_block_group3_5_1.smtx",
    "rn50/variational_dropout/0.95/bottleneck_2_block_group3_5_1.smtx",
    "transformer/magnitude_pruning/0.95/"
    "body_encoder_layer_0_self_attention_multihead_attention_q_fully_connected.smtx",
]


def _dsb_reference_order(labels):
    """DSB's extract_dense: a dict of clusters keyed in row order, stable-sorted by size."""
    clusters = {}
    for i, z in enumerate(labels.tolist()):
        clusters.setdefault(z, []).append(i)
    return [x for _, v in sorted(clusters.items(), key=lambda t: len(t[1]), reverse=True)
            for x in v]


def _partition(labels):
    return {frozenset(np.flatnonzero(labels == z).tolist()) for z in np.unique(labels)}


@pytest.mark.parametrize("rel", DLMC_SAMPLE)
def test_dsb_equals_sklearn_agglomerative_on_dlmc(dlmc_dir, rel):
    cluster = pytest.importorskip("sklearn.cluster")
    X = read_smtx(dlmc_dir / rel)
    n = X.shape[0]
    D = cosine_distance(X)
    for size in (16, 32):
        # DSB's call: n_clusters=max(out_channels // block_size, 1), complete, precomputed.
        k = max(n // size, 1)
        ref = cluster.AgglomerativeClustering(n_clusters=k, linkage="complete",
                                              metric="precomputed").fit(D).labels_
        labels, diameter = dsb_clusters(X, size)
        assert len(np.unique(labels)) == k == len(diameter)
        assert _partition(labels) == _partition(ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DSBDegenerateWarning)
            perm = dsb(X, size)
        assert perm.tolist() == _dsb_reference_order(ref)


def test_dsb_distance_is_one_minus_cosine_of_binary_rows():
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    rng = np.random.default_rng(3)
    X = sp.random(40, 30, density=0.15, random_state=3, format="csr")
    X.data[:] = rng.random(X.nnz) + 0.5          # values must not matter
    X = sp.vstack([X, sp.csr_matrix((2, 30))]).tocsr()   # empty rows: distance 1 to all
    D = cosine_distance(X)
    ref = pairwise.cosine_distances((X != 0).astype(float))
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(D, ref, atol=1e-12)
    assert (D[-1, :-1] == 1.0).all() and (D == D.T).all()


def test_dsb_asks_for_floor_n_over_b_clusters_like_dsb():
    X = sp.random(70, 40, density=0.3, random_state=0, format="csr")
    assert len(np.unique(dsb_clusters(X, 16)[0])) == 70 // 16
    assert len(np.unique(dsb_clusters(X, 100)[0])) == 1


def test_dsb_equal_sized_clusters_keep_the_order_of_their_first_row():
    # Clusters {1, 3} and {0, 2} have the same size: the one holding row 0 comes first.
    X = np.zeros((4, 4))
    X[[1, 3], 0:2] = 1
    X[[0, 2], 2:4] = 1
    assert dsb(sp.csr_matrix(X), 2).tolist() == [0, 2, 1, 3]


def test_dsb_warns_when_rows_sharing_no_column_are_clustered():
    # 8 rows on 8 different columns: every distance is 1.0, the 4 clusters are tie order.
    X = sp.identity(8, format="csr")
    with pytest.warns(DSBDegenerateWarning, match=r"8x8 matrix.*distance 1\.0.*8 clusters "
                                                  r"left for the 4 asked.*tied merges"
                      ) as rec:
        perm = dsb(X, 2)
    assert sorted(perm.tolist()) == list(range(8))
    w = rec[0].message
    assert isinstance(w, RuntimeWarning)
    assert (w.shape, w.n_clusters, w.similar_clusters) == ((8, 8), 4, 8)
    labels, diameter = dsb_clusters(X, 2)
    assert w.unrelated_rows == np.bincount(labels)[diameter == 1.0].sum() > 0


def test_dsb_warns_when_it_returns_the_identity_order():
    # 6 rows in panels of 4: DSB asks for max(6 // 4, 1) = 1 cluster, nothing moves.
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.random((6, 10)) < 0.5)
    with pytest.warns(DSBDegenerateWarning, match=r"6x10 matrix.*identity.*one cluster") \
            as rec:
        perm = dsb(X, 4)
    assert perm.tolist() == list(range(6))
    assert rec[0].message.identity and rec[0].message.n_clusters == 1


def test_dsb_does_not_warn_on_a_clustered_matrix():
    # Planted groups on their own columns, each with one column all its rows use: groups
    # share nothing (distance 1.0), but the cut falls between them (diameters < 1).
    rng = np.random.default_rng(0)
    X = np.zeros((48, 36))
    for g in range(3):
        X[g * 16:(g + 1) * 16, g * 12:(g + 1) * 12] = rng.random((16, 12)) < 0.7
        X[g * 16:(g + 1) * 16, g * 12] = 1
    hidden = rng.permutation(48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        perm = dsb(sp.csr_matrix(X[hidden]), 16)
        dsb(sp.csr_matrix(X[:10]), 16)                  # a single panel: nothing to warn
    truth = {frozenset(np.flatnonzero(hidden // 16 == g).tolist()) for g in range(3)}
    assert {frozenset(perm[i:i + 16].tolist()) for i in range(0, 48, 16)} == truth


def test_a_degenerate_dsb_is_said_in_the_layer_metrics_with_or_without_isolation():
    """The warning reaches the result file's metrics, also when a time limit runs the
    partitioner in a subprocess (the same words either way)."""
    from regroup import from_array, regroup_pattern
    rng = np.random.default_rng(0)
    pat = from_array(rng.random((96, 64)) < 0.05)     # rows sharing no column: ties at 1.0
    said = []
    for time_limit in (None, 60.0):
        with pytest.warns(RuntimeWarning, match="dsb degenerates"):
            r = regroup_pattern(pat, block=16, format="shuffled", method="dsb",
                                time_limit=time_limit)
        said.append(r.metrics["warnings"])
    assert said[0] == said[1] and "dsb degenerates on the 96x64 matrix" in said[0]["dsb"][0]
