import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from hypothesis import given, settings
from hypothesis import strategies as st

from regroup import column_net, cut, km1, write_hgr
from regroup.hypergraph import format_hgr
from regroup.metrics import panel_km1
from regroup.similarity import jaccard, knn_similarity, shared_counts, similarity_graph


@pytest.fixture
def binary():
    rng = np.random.default_rng(3)
    return sp.csr_matrix((rng.random((40, 30)) < 0.2).astype(float))


def test_shared_counts_match_naive(binary):
    d = binary.toarray()
    naive = np.array([[np.sum(d[i] * d[j]) for j in range(40)] for i in range(40)])
    np.fill_diagonal(naive, 0)
    np.testing.assert_array_equal(shared_counts(binary), naive)


def test_jaccard_matches_scipy(binary):
    d = binary.toarray().astype(bool)
    J = jaccard(binary)
    ref = 1.0 - cdist(d, d, metric="jaccard")
    empty = ~d.any(axis=1)
    ref[np.ix_(empty, empty)] = 0.0   # scipy says 0 distance for two empty rows; we say 0 sim
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(J, np.nan_to_num(ref), atol=1e-12)


@pytest.mark.parametrize("metric", ["shared", "jaccard"])
def test_knn_keeps_each_rows_top_neighbours(metric):
    rng = np.random.default_rng(0)
    X = sp.random(60, 50, density=0.3, random_state=1, format="csr")
    X.data = rng.random(X.nnz) + 0.1          # continuous weights: no ties
    dense = shared_counts(X) if metric == "shared" else jaccard(X)
    G = knn_similarity(X, 5, metric=metric, block_rows=7)
    assert (G != G.T).nnz == 0 and G.diagonal().sum() == 0
    for i in range(60):
        top = set(np.argsort(-dense[i])[:5])
        assert top <= set(G[i].indices)
        np.testing.assert_allclose(G[i, list(top)].toarray().ravel(), dense[i, list(top)])


def test_similarity_graph_switches_to_knn_when_asked(binary):
    assert similarity_graph(binary).nnz >= similarity_graph(binary, knn=3).nnz


def _naive_lambda(X, labels):
    d = X.toarray() != 0
    return [len(set(labels[d[:, c]])) for c in range(d.shape[1]) if d[:, c].any()]


def test_km1_and_cut_match_naive(binary):
    labels = np.random.default_rng(1).integers(0, 4, size=40)
    hg = column_net(binary)
    lam = np.array(_naive_lambda(binary, labels))
    assert km1(hg, labels) == int(np.sum(lam - 1))
    assert cut(hg, labels) == int(np.sum(lam > 1))
    assert hg.n_nets == int((binary.getnnz(axis=0) > 0).sum())


def test_hgr_golden(tmp_path):
    X = sp.csr_matrix(np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]]))
    hg = column_net(X, net_weights=[5, 9, 7])
    assert list(format_hgr(hg)) == ["2 3 1", "5 1 2", "7 1 3"]
    write_hgr(hg, tmp_path / "x.hgr")
    assert (tmp_path / "x.hgr").read_text() == "2 3 1\n5 1 2\n7 1 3\n"
    assert list(format_hgr(column_net(X, node_weights=[1, 2, 3])))[-3:] == ["1", "2", "3"]


def test_knn_memory_stays_bounded_at_16k_rows():
    import tracemalloc
    n = 16384
    X = sp.random(n, 512, density=0.01, random_state=0, format="csr")
    X.data[:] = 1.0
    tracemalloc.start()
    G = knn_similarity(X, 8, block_rows=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert G.shape == (n, n) and G.nnz <= 2 * 8 * n
    # One 256 x 16384 float64 block plus the O(n k) graph; a dense n x n would be 2 GiB.
    assert peak < 200 * 2**20, peak


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_blas_path_matches_sparse_path(monkeypatch, weighted):
    import regroup.similarity as S
    X = sp.random(300, 200, density=0.4, random_state=2, format="csr")
    if not weighted:
        X.data[:] = 1.0
    monkeypatch.setattr(S, "DENSE_PRODUCT_DENSITY", 1.0)          # sparse BLAS
    ref_s, ref_j = S.shared_counts(X), S.jaccard(X)
    ref_k = S.knn_similarity(X, 7, block_rows=50)
    monkeypatch.setattr(S, "DENSE_PRODUCT_DENSITY", 0.0)          # dense BLAS ...
    monkeypatch.setattr(S, "_DENSE_BLOCK_ELEMS", 200 * 64)        # ... 64 rows at a time
    np.testing.assert_allclose(S.shared_counts(X), ref_s, rtol=1e-12)
    np.testing.assert_allclose(S.jaccard(X), ref_j, rtol=1e-12)
    assert abs(S.knn_similarity(X, 7, block_rows=50) - ref_k).max() < 1e-9


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 9), st.floats(0.0, 1.0),
       st.integers(0, 2**31 - 1))
def test_panel_km1_counts_like_the_column_net(n, m, br, density, seed):
    # Wide, sparse matrices take the sort branch; dense ones the presence table.
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng)
    perm = rng.permutation(n)
    labels = np.empty(n, np.intp)
    labels[perm] = np.arange(n) // br
    expect = km1(column_net(X), labels) if X.nnz else 0
    assert panel_km1(X, perm, br) == expect == int(np.sum(np.array(
        _naive_lambda(X, labels), dtype=np.int64) - 1))


def test_panel_km1_on_a_wide_sparse_matrix():
    # Columns x panels far above the entries: counted by sorting, not by a table.
    rng = np.random.default_rng(3)
    cols = rng.choice(200_000, 300, replace=False)
    X = sp.csr_matrix((np.ones(900), (rng.integers(0, 6, 900), np.repeat(cols, 3))),
                      shape=(6, 200_000))
    X.sum_duplicates()
    perm = rng.permutation(6)
    labels = np.empty(6, np.intp)
    labels[perm] = np.arange(6) // 2
    assert X.shape[1] * 3 > 4 * X.nnz + (1 << 16)
    assert panel_km1(X, perm, 2) == km1(column_net(X), labels) > 0


def test_panel_km1_checks_its_order_and_takes_a_pattern():
    from regroup import from_sparse
    X = sp.csr_matrix(np.eye(4))
    for bad in (np.arange(5), np.array([0, 0, 1, 2]), np.array([0, 1, 2, 7])):
        with pytest.raises(ValueError, match="'row_perm' parameter of panel_km1 must be"):
            panel_km1(X, bad, 2)
    with pytest.raises(ValueError, match="'br' parameter of panel_km1"):
        panel_km1(X, np.arange(4), 0)
    X = sp.csr_matrix(np.ones((4, 3)))
    assert panel_km1(from_sparse(X), np.arange(4), 2) == panel_km1(X, np.arange(4), 2) == 3
