"""Row-row similarity of a sparsity pattern, computed with sparse or dense BLAS.

For a nonnegative matrix ``X`` (rows = items), ``shared = X @ X.T``. On a binary pattern that
is the number of columns two rows share, and ``jaccard = shared / (|a| + |b| - shared)``; on
weighted rows the same formula is the Tanimoto coefficient. Diagonals are zero in every
returned matrix (an item is not its own neighbour).

Products of sparse-enough patterns use sparse BLAS; above ``DENSE_PRODUCT_DENSITY`` the
rows are densified (a block of rows at a time; float32 when that is exact, as for counts
below 2**24) and multiplied with dense BLAS, orders of magnitude faster at 50 % density.

Bounds (tall matrices: many rows, few columns, are cheap to hold but have rows^2 pairs):

- :func:`shared_counts` and :func:`jaccard` return dense ``n x n`` arrays and refuse more
  than ``MAX_DENSE_ROWS`` rows; :func:`similarity_graph` uses them up to ``DENSE_LIMIT``.
- :func:`condensed_distance` (what hierarchical clustering needs) holds only the
  ``n (n - 1) / 2`` pairs, built a block of rows at a time.
- :func:`knn_similarity` scores every pair up to ``EXACT_KNN_ROWS`` rows (``O(n^2)`` work
  in blocks); above, each row's neighbours are chosen among candidate rows that agree with
  it on MinHash signatures (``O(n)`` pairs, so linear in the input), and a
  ``RuntimeWarning`` says so (the engine records it in the layer's metrics).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .validation import check_choice, check_int

__all__ = ["shared_counts", "jaccard", "knn_similarity", "similarity_graph",
           "condensed_distance", "condensed_rows", "METRICS", "DENSE_LIMIT",
           "MAX_DENSE_ROWS", "EXACT_KNN_ROWS"]

METRICS = ("shared", "jaccard")

# Above this many rows the dense n x n product is replaced by a kNN graph (memory O(n*k)).
DENSE_LIMIT = 4096
DEFAULT_KNN = 64
# The dense n x n functions refuse more rows than this: 8192^2 float64 is 512 MiB a copy.
MAX_DENSE_ROWS = 8192
# Up to this many rows the kNN graph scores every pair of rows (rows^2 work: ~3 s for both
# metrics at 8192 x 20 on 2 cores, 16x that at 4x the rows); above, candidate pairs only.
EXACT_KNN_ROWS = 8192
# Approximate kNN: rows are sorted by CANDIDATE_ORDERS MinHash signatures, and each row is
# scored against the CANDIDATE_WINDOW rows on either side of it in each order (at most
# 2 * orders * window = 64 candidates a row, about DEFAULT_KNN).
CANDIDATE_ORDERS = 4
CANDIDATE_WINDOW = 8
# ... and then against the HOP_NEIGHBOURS best neighbours of its HOP_NEIGHBOURS best ones.
HOP_NEIGHBOURS = 8
# Pairs scored at a time by the approximate kNN (bounded by their stored entries too).
_PAIR_CHUNK_NNZ = 1 << 22
# Condensed distances: rows of the full distance block computed at a time (cells).
_CONDENSED_BLOCK_ELEMS = 1 << 22


# Above this density products go through dense BLAS (sparse products cost sum_c nnz_c^2).
DENSE_PRODUCT_DENSITY = 0.05
_DENSE_BLOCK_ELEMS = 1 << 26    # rows densified at a time: 64 M float32 = 256 MB


def _csr(X) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64)
    X.sort_indices()
    return X


def _dense_rows(X: sp.csr_matrix, start: int, stop: int, dtype) -> np.ndarray:
    return X[start:stop].toarray().astype(dtype)


def _product(X: sp.csr_matrix, rows: slice | None = None) -> np.ndarray:
    """``X[rows] @ X.T`` as a dense float64 array, with sparse or dense BLAS."""
    n, m = X.shape
    start, stop = (0, n) if rows is None else (rows.start, rows.stop)
    if X.nnz <= DENSE_PRODUCT_DENSITY * n * m:
        return (X[start:stop] @ X.T).toarray()
    # float32 is exact for integer data whose products stay below 2**24; else float64.
    exact32 = np.all(X.data == np.round(X.data)) and X.data.max(initial=0) ** 2 * m < 2**24
    dtype = np.float32 if exact32 else np.float64
    step = max(1, _DENSE_BLOCK_ELEMS // max(m, 1))
    out = np.empty((stop - start, n))
    for c0 in range(0, n, step):
        right = _dense_rows(X, c0, min(c0 + step, n), dtype)
        for r0 in range(start, stop, step):
            r1 = min(r0 + step, stop)
            left = right if (r0, r1) == (c0, c0 + right.shape[0]) else \
                _dense_rows(X, r0, r1, dtype)
            out[r0 - start:r1 - start, c0:c0 + right.shape[0]] = left @ right.T
    return out


def _check_dense_rows(n: int, caller: str) -> None:
    if n > MAX_DENSE_ROWS:
        raise ValueError(f"{caller} returns a dense {n}x{n} array; it is limited to "
                         f"{MAX_DENSE_ROWS} rows (regroup.similarity.MAX_DENSE_ROWS). Use "
                         "knn_similarity or similarity_graph (sparse) instead.")


def shared_counts(X) -> np.ndarray:
    """Dense ``X @ X.T`` with a zero diagonal, shape (n, n); at most ``MAX_DENSE_ROWS``
    rows (ValueError above)."""
    _check_dense_rows(X.shape[0], "shared_counts")
    X = _csr(X)
    S = _product(X)
    np.fill_diagonal(S, 0.0)
    return S


def _tanimoto(S: np.ndarray, sq_row: np.ndarray, sq_col: np.ndarray) -> np.ndarray:
    denom = sq_row[:, None] + sq_col[None, :] - S
    out = np.zeros_like(S)
    np.divide(S, denom, out=out, where=denom > 0)
    return out


def jaccard(X) -> np.ndarray:
    """Dense Jaccard (Tanimoto for weighted rows) similarity, shape (n, n), zero diagonal;
    at most ``MAX_DENSE_ROWS`` rows (ValueError above)."""
    _check_dense_rows(X.shape[0], "jaccard")
    X = _csr(X)
    S = _product(X)
    sq = S.diagonal().copy()
    J = _tanimoto(S, sq, sq)
    np.fill_diagonal(J, 0.0)
    return J


def condensed_rows(n: int, rows: Callable[[int, int], np.ndarray], *,
                   block_rows: int | None = None) -> np.ndarray:
    """The strict upper triangle of an ``n x n`` matrix in scipy's condensed order (what
    ``squareform(M, checks=False)`` returns), from ``rows(start, stop)``, which gives rows
    ``start..stop-1`` of ``M`` in full. Memory: the ``n (n - 1) / 2`` float64 result and
    one block of rows (``block_rows``; default: about 4 M cells)."""
    n = check_int(n, "n", "condensed_rows", low=0)
    step = block_rows or max(1, _CONDENSED_BLOCK_ELEMS // max(n, 1))
    out = np.empty(n * (n - 1) // 2)
    cols = np.arange(n)
    pos = 0
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = rows(start, stop)
        if block.shape != (stop - start, n):
            raise ValueError(f"condensed_rows: rows({start}, {stop}) returned shape "
                             f"{block.shape}; expected {(stop - start, n)}")
        vals = block[cols[None, :] > np.arange(start, stop)[:, None]]   # row-major: j > i
        out[pos:pos + vals.size] = vals
        pos += vals.size
    return out


def condensed_distance(X, *, block_rows: int | None = None) -> np.ndarray:
    """Jaccard distance ``1 - jaccard(X)`` (clipped at 0) of every pair of rows ``i < j``,
    in scipy's condensed order, without the dense ``n x n`` array: memory ``n (n - 1) / 2``
    float64 plus one block of rows. On count data (binary or integer rows) it equals
    ``squareform(np.clip(1 - jaccard(X), 0, None), checks=False)`` bit for bit."""
    X = _csr(X)
    sq = np.asarray(X.multiply(X).sum(axis=1)).ravel()

    def rows(start: int, stop: int) -> np.ndarray:
        J = _tanimoto(_product(X, slice(start, stop)), sq[start:stop], sq)
        return np.clip(1.0 - J, 0.0, None)

    return condensed_rows(X.shape[0], rows, block_rows=block_rows)


def _minhash_orders(X: sp.csr_matrix, orders: int, seed: int) -> list[np.ndarray]:
    """``orders`` row orders, each sorting the rows by a different rotation of the same
    ``orders`` MinHash values (rows agreeing on more of them end up closer); empty rows
    last. Deterministic for ``seed``."""
    n, m = X.shape
    rng = np.random.default_rng(seed)
    filled = np.flatnonzero(np.diff(X.indptr))
    sigs = np.full((orders, n), m, dtype=np.int64)
    for h in range(orders):
        rank = rng.permutation(m)
        if filled.size:
            # Segments from one filled row's start to the next hold that row's entries only.
            sigs[h, filled] = np.minimum.reduceat(rank[X.indices], X.indptr[filled])
    idx = np.arange(n)
    # np.lexsort sorts by its last key first: signature h, then h + 1, ..., then the index.
    return [np.lexsort([idx] + [sigs[(h + j) % orders] for j in range(orders)][::-1])
            for h in range(orders)]


def _candidate_pairs(X: sp.csr_matrix, orders: int, window: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs ``a < b`` of rows within ``window`` places of each other in one of
    the MinHash orders: at most ``n * orders * window`` pairs."""
    n = X.shape[0]
    keys = []
    for order in _minhash_orders(X, orders, seed):
        for d in range(1, min(window, n - 1) + 1):
            a, b = order[:-d].astype(np.int64), order[d:].astype(np.int64)
            keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    if not keys:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    a, b = np.divmod(_distinct(np.concatenate(keys)), n)
    return a.astype(np.intp), b.astype(np.intp)


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array (sorts it in place; faster here than
    np.unique's hashing)."""
    keys.sort()
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys


def _pair_products(X: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``X[a[t]] . X[b[t]]`` for every t, in chunks of about ``_PAIR_CHUNK_NNZ`` stored
    entries (rows of any length)."""
    out = np.zeros(a.size)
    if not a.size:
        return out
    lengths = np.diff(X.indptr)
    cum = np.cumsum(lengths[a] + lengths[b], dtype=np.int64)
    bounds = np.searchsorted(cum, np.arange(_PAIR_CHUNK_NNZ, int(cum[-1]), _PAIR_CHUNK_NNZ))
    bounds = np.unique(np.concatenate([[0], bounds, [a.size]]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] = np.asarray(X[a[lo:hi]].multiply(X[b[lo:hi]]).sum(axis=1)).ravel()
    return out


def _scored_pairs(X: sp.csr_matrix, a: np.ndarray, b: np.ndarray, metric: str,
                  sq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs ``(a, b)`` of positive similarity, and that similarity."""
    S = _pair_products(X, a, b)
    if metric == "jaccard":
        denom = sq[a] + sq[b] - S
        S = np.divide(S, denom, out=np.zeros_like(S), where=denom > 0)
    pos = S > 0
    return a[pos], b[pos], S[pos]


def _top_k(a: np.ndarray, b: np.ndarray, S: np.ndarray, k: int, n: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values): each row's ``k`` best of the undirected pairs ``(a, b)``, by
    decreasing value, then lower column; rows in increasing order. Rows are taken a block
    at a time (about ``_PAIR_CHUNK_NNZ / 2`` directed pairs), so memory stays near the
    input's."""
    by_a, by_b = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    a_sorted, b_sorted = a[by_a], b[by_b]
    step = max(1, int(n * (_PAIR_CHUNK_NNZ // 4) // max(a.size, 1)))
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        ia = by_a[np.searchsorted(a_sorted, start):np.searchsorted(a_sorted, stop)]
        ib = by_b[np.searchsorted(b_sorted, start):np.searchsorted(b_sorted, stop)]
        rows, cols = np.concatenate([a[ia], b[ib]]), np.concatenate([b[ia], a[ib]])
        vals = np.concatenate([S[ia], S[ib]])
        order = np.lexsort((cols, -vals, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        keep = np.arange(rows.size) - np.searchsorted(rows, rows, side="left") < k
        out.append((rows[keep], cols[keep], vals[keep]))
    if not out:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*out))  # type: ignore[return-value]


def _pair_keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    a, b = a.astype(np.int64), b.astype(np.int64)
    return np.minimum(a, b) * n + np.maximum(a, b)


def _approximate_neighbours(X: sp.csr_matrix, k: int, metric: str, sq: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of each row's ``k`` most similar candidate rows (positive
    similarity; ties: lower column first). Candidates: the rows near it in the MinHash
    orders (:func:`_candidate_pairs`), then, once, the ``HOP_NEIGHBOURS`` best
    neighbours of its ``HOP_NEIGHBOURS`` best neighbours."""
    n = X.shape[0]
    a, b = _candidate_pairs(X, CANDIDATE_ORDERS, CANDIDATE_WINDOW, seed=0)
    a, b, S = _scored_pairs(X, a, b, metric, sq)
    rows, cols, _ = _top_k(a, b, S, HOP_NEIGHBOURS, n)
    # Each row's best neighbours as an n x t table (-1: none), then two hops along it.
    t = HOP_NEIGHBOURS
    slot = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    table = np.full((n, t), -1, np.intp)
    table[rows, slot] = cols
    hop = table[np.maximum(table, 0)].reshape(n, t * t)
    hop[np.repeat(table < 0, t, axis=1)] = -1
    src = np.repeat(np.arange(n), t * t)
    dst = hop.ravel()
    ok = (dst >= 0) & (dst != src)
    src, dst = src[ok], dst[ok]
    del hop, ok, table
    known = _pair_keys(a, b, n)            # sorted: a, b come sorted by this key
    new = _distinct(_pair_keys(src, dst, n))
    del src, dst
    at = np.minimum(np.searchsorted(known, new), max(known.size - 1, 0))
    new = new[known[at] != new] if known.size else new
    a2, b2, S2 = _scored_pairs(X, *(x.astype(np.intp) for x in np.divmod(new, n)), metric,
                               sq)
    return _top_k(np.concatenate([a, a2]), np.concatenate([b, b2]), np.concatenate([S, S2]),
                  k, n)


def knn_similarity(X, k: int, *, metric: str = "shared", block_rows: int = 256,
                   approximate: bool | None = None) -> sp.csr_matrix:
    """Symmetric kNN-sparsified similarity graph.

    Each row keeps its ``k`` most similar other rows (ties broken by lower index); the
    result is the union of both directions, with the similarity as value.

    Exact (``approximate`` False; the default up to ``EXACT_KNN_ROWS`` rows): every pair
    is scored, the product formed ``block_rows`` rows at a time, so peak memory is
    ``O(block_rows * n + n * k)`` and the work ``O(n^2)``. Approximate (True; the default
    above ``EXACT_KNN_ROWS`` rows, with a ``RuntimeWarning`` saying so): the neighbours
    are chosen among the rows within ``CANDIDATE_WINDOW`` places of a row in
    ``CANDIDATE_ORDERS`` MinHash orders (rows sharing columns sort together), scored
    exactly: at most ``2 * CANDIDATE_ORDERS * CANDIDATE_WINDOW`` pairs a row, so time
    and memory are linear in the input. Deterministic either way.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n, n), symmetric, zero diagonal, positive values.
    """
    check_choice(metric, "metric", "knn_similarity", METRICS)
    X = _csr(X)
    n = X.shape[0]
    k = check_int(k, "k", "knn_similarity", low=1)
    block_rows = check_int(block_rows, "block_rows", "knn_similarity", low=1)
    if approximate is not None and not isinstance(approximate, bool):
        raise TypeError(f"The 'approximate' parameter of knn_similarity must be None, True "
                        f"or False. Got {approximate!r} instead.")
    k = min(k, max(n - 1, 1))
    sq = np.asarray(X.multiply(X).sum(axis=1)).ravel()
    if approximate is None and n > EXACT_KNN_ROWS:
        approximate = True
        warnings.warn(f"similarity: {n} rows are more than {EXACT_KNN_ROWS} "
                      "(regroup.similarity.EXACT_KNN_ROWS): each row's "
                      f"{k} nearest neighbours ({metric}) are chosen among the rows next to "
                      f"it in {CANDIDATE_ORDERS} MinHash orders (approximate kNN), not among "
                      "all rows", RuntimeWarning, stacklevel=2)
    if approximate:
        rows, cols, vals = _approximate_neighbours(X, k, metric, sq)
        return _symmetric(rows, cols, vals, n)
    rows_out, cols_out, vals_out = [], [], []
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        S = _product(X, slice(start, stop))
        if metric == "jaccard":
            S = _tanimoto(S, sq[start:stop], sq)
        S[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        # argpartition may break ties at the k-th value either way, but reproducibly.
        idx = np.argpartition(-S, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(S, idx, axis=1)
        keep = vals > 0
        r = np.repeat(np.arange(start, stop), k).reshape(-1, k)
        rows_out.append(r[keep])
        cols_out.append(idx[keep])
        vals_out.append(vals[keep])
    rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.intp)
    cols = np.concatenate(cols_out) if cols_out else np.zeros(0, np.intp)
    vals = np.concatenate(vals_out) if vals_out else np.zeros(0)
    return _symmetric(rows, cols, vals, n)


def _symmetric(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int
               ) -> sp.csr_matrix:
    """The graph of the directed (row, col, value) edges, each pair at most once, made
    symmetric with the larger value."""
    G = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    # Symmetrise with max: duplicate (i, j) from both directions carries the same value.
    G = G.maximum(G.T).tocsr()
    G.sort_indices()
    return G


def similarity_graph(X, metric: str = "shared", *, knn: int | None = None) -> sp.csr_matrix:
    """Similarity as a sparse symmetric graph with zero diagonal.

    With ``knn`` given, each row keeps its ``knn`` most similar rows. Otherwise the dense
    product is used up to ``DENSE_LIMIT`` rows and the kNN graph (k = ``DEFAULT_KNN``)
    above: exact up to ``EXACT_KNN_ROWS`` rows, approximate above (see
    :func:`knn_similarity`). Measured on DLMC, sparsifying graphs that fit densely cost
    METIS 0.008-0.03 mean retained, so it is not done.
    """
    check_choice(metric, "metric", "similarity_graph", METRICS)
    n = X.shape[0]
    if knn is None and n <= DENSE_LIMIT:
        S = shared_counts(X) if metric == "shared" else jaccard(X)
        G = sp.csr_matrix(S)
        G.eliminate_zeros()
        return G
    return knn_similarity(X, knn or DEFAULT_KNN, metric=metric)
