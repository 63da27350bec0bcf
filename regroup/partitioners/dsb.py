"""DSB "shuffled blocks" row grouping (NeurIPS'22), re-implemented as a baseline.

As in the published method's public code (``extract_dense``): rows are compared by
1 - cosine similarity of their binary patterns (the code calls it "jaccard"), and
``sklearn.cluster.AgglomerativeClustering(n_clusters=max(n // b, 1), linkage="complete",
affinity="precomputed")`` groups them; the clusters, largest first, are concatenated and cut
into panels of ``b`` rows. The tiles are then chosen per panel as in regroup's shuffled
format (columns ranked by count, or by ``sum |w|`` where the published code uses the weight
norm). As in DSB, ``k = max(n // b, 1)``, rounded down: when ``b`` does not divide ``n`` the
short last panel has no cluster of its own (1000 rows, ``b = 32``: 31 clusters, 32 panels).

The clustering is computed without scikit-learn, by the same two steps scikit-learn takes
for a precomputed distance without connectivity: ``scipy.cluster.hierarchy.linkage`` on the
upper triangle of the distance matrix, then the tree cut by merge order (undo the last
``k - 1`` merges, as ``sklearn.cluster._agglomerative._hc_cut`` and
``scipy.cluster.hierarchy.cut_tree`` do). That always gives exactly ``k`` clusters, also when
many merges tie; a cut by height (``fcluster(..., criterion="maxclust")``) does not: on sparse
masks many row pairs share no column (distance exactly 1.0), the top merges tie at 1.0, and
a height cut returned one cluster - the identity order - on 57 of the 108 DLMC matrices
at ``b = 32`` (49 at ``b = 16``). The partition equals scikit-learn's on all 108 DLMC
matrices at ``b = 16`` and ``32`` (tests/test_baselines.py keeps scikit-learn as the
oracle on a sample), so scikit-learn is not needed at run time.

Where the rows share too little, DSB itself degenerates: complete linkage reaches the
maximal distance 1.0 before ``k`` clusters, and the remaining merges, all tied, follow the
library's merge order; :func:`dsb` then emits a :class:`DSBDegenerateWarning` (see there).

Differences from the published code, none of which changes the method: distances are
computed in float64 (the published code uses float32 torch tensors, so exact ties between
nearly equal distances may break differently); clipping of ``-1e-16`` rounding to 0.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from ..validation import PartitionerError
from ..similarity import DENSE_LIMIT, condensed_rows
from .hierarchical import MAX_ROWS
from .registry import PartitionerSpec, register

__all__ = ["dsb", "dsb_clusters", "cosine_distance", "condensed_cosine_distance",
           "DSBDegenerateWarning"]


class DSBDegenerateWarning(RuntimeWarning):
    """DSB's clustering did not group the rows by similarity (see :func:`dsb`).

    Attributes
    ----------
    shape : tuple of int
        The matrix shape.
    n_clusters : int
        ``max(n // size, 1)``, the number of clusters DSB asks for.
    similar_clusters : int
        Clusters complete linkage has formed when it reaches the maximal distance 1.0
        (every pair of them has two rows sharing no column). Above ``n_clusters``, DSB's
        clusters are unions of these, chosen by the order of tied merges.
    unrelated_rows : int
        Rows in the clusters so formed (complete-linkage diameter 1.0).
    largest : int
        Rows in the largest cluster.
    identity : bool
        The returned order is the identity (more than one panel, nothing moved).
    """

    def __init__(self, message: str, *, shape, n_clusters: int, similar_clusters: int,
                 unrelated_rows: int, largest: int, identity: bool):
        super().__init__(message)
        self.shape = tuple(shape)
        self.n_clusters = n_clusters
        self.similar_clusters = similar_clusters
        self.unrelated_rows = unrelated_rows
        self.largest = largest
        self.identity = identity


def cosine_distance(X) -> np.ndarray:
    """DSB's row distance: ``1 - cosine`` of the binary row patterns, dense ``n x n``.

    An empty row has cosine 0 to every row (distance 1), as ``torch.cosine_similarity``
    gives. The diagonal is 0; rounding below 0 is clipped.
    """
    B, norms = _binary_rows(X)
    D = _cosine_rows(B, norms, 0, B.shape[0])
    np.fill_diagonal(D, 0.0)
    return D


def _binary_rows(X) -> tuple[sp.csr_matrix, np.ndarray]:
    B = sp.csr_matrix(X, dtype=np.float64, copy=True)
    B.data[:] = 1.0
    return B, np.sqrt(np.asarray(B.sum(axis=1)).ravel())


def _cosine_rows(B: sp.csr_matrix, norms: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start..stop-1`` of the distance matrix (diagonal not cleared)."""
    D = (B[start:stop] @ B.T).toarray()
    denom = np.outer(norms[start:stop], norms)
    np.divide(D, denom, out=D, where=denom > 0)      # empty rows: S is 0 already
    del denom
    np.subtract(1.0, D, out=D)
    np.maximum(D, 0.0, out=D)
    return D


def condensed_cosine_distance(X) -> np.ndarray:
    """:func:`cosine_distance` for every pair ``i < j`` in scipy's condensed order (equal
    to ``squareform(cosine_distance(X), checks=False)`` bit for bit), built a block of rows
    at a time: memory ``n (n - 1) / 2`` float64, never ``n x n``."""
    B, norms = _binary_rows(X)
    return condensed_rows(B.shape[0], lambda start, stop: _cosine_rows(B, norms, start, stop))


def dsb_clusters(X, size: int) -> tuple[np.ndarray, np.ndarray]:
    """DSB's clusters of the rows of ``X``.

    Returns
    -------
    labels : ndarray of intp, shape (n,)
        Cluster ids ``0..k-1`` with ``k = max(n // size, 1)`` (the ids themselves are
        arbitrary; the partition is scikit-learn's).
    diameter : ndarray of float, shape (k,)
        Complete-linkage height of each cluster (its largest pairwise distance; 0 for a
        single row).
    """
    labels, diameter, _ = _clusters(X, size)
    return labels, diameter


def _clusters(X, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`dsb_clusters`, and the number of clusters complete linkage has formed when
    it reaches the maximal distance 1.0 (``n`` minus the merges below 1.0)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n = X.shape[0]
    if n > MAX_ROWS:
        raise PartitionerError(f"dsb needs O(n^2) memory and time and is limited to "
                               f"{MAX_ROWS} rows (regroup.partitioners.hierarchical.MAX_ROWS; "
                               f"got {n})")
    k = max(n // size, 1)
    if k <= 1 or n < 2:
        return np.zeros(n, dtype=np.intp), np.zeros(1 if n else 0), 1 if n else 0
    condensed = (squareform(cosine_distance(X), checks=False) if n <= DENSE_LIMIT
                 else condensed_cosine_distance(X))
    Z = linkage(condensed, method="complete")
    # Keep the first n - k merges (undo the last k - 1): every node's root, top down.
    root = np.arange(2 * n - 1, dtype=np.intp)
    children = Z[:, :2].astype(np.intp)
    for i in range(n - k - 1, -1, -1):
        root[children[i]] = root[n + i]
    roots, labels = np.unique(root[:n], return_inverse=True)
    diameter = np.where(roots >= n, Z[np.maximum(roots - n, 0), 2], 0.0)
    below = n - int(np.count_nonzero(Z[:, 2] < 1.0))
    return labels.astype(np.intp), diameter, below


def dsb(X, size: int, *, rng=None) -> np.ndarray:
    """Complete-linkage clusters on cosine distance, concatenated largest first.

    Clusters of equal size keep the order of their first row (DSB sorts a dict keyed in row
    order with a stable sort); rows inside a cluster stay in index order. Deterministic.

    Warns
    -----
    DSBDegenerateWarning
        A ``RuntimeWarning``, when the grouping is not driven by similarity (the faithful
        result is returned either way):

        * tied merges: complete linkage reaches the maximal distance 1.0 (two rows sharing
          no column) with more clusters left than DSB asks for, so some clusters are
          unions made at distance 1.0 - where every remaining pair ties - in scipy's (and
          scikit-learn's) merge order, not by similarity; equivalently, some cluster's
          diameter is 1.0;
        * identity: the order returned is the identity while there is more than one panel
          (for example a single cluster, ``size < n < 2 * size``).
    """
    n = X.shape[0]
    labels, diameter, below = _clusters(X, size)
    if n == 0:
        return np.arange(0, dtype=np.intp)
    sizes = np.bincount(labels)
    first = np.full(len(sizes), n, dtype=np.intp)
    np.minimum.at(first, labels, np.arange(n, dtype=np.intp))
    perm = np.lexsort((np.arange(n), first[labels], -sizes[labels])).astype(np.intp)
    identity = n > size and bool((perm == np.arange(n)).all())
    unrelated = int(sizes[diameter >= 1.0].sum()) if len(sizes) > 1 else 0
    if identity or unrelated:
        k, largest = len(sizes), int(sizes.max())
        why = []
        if unrelated:
            why.append(f"complete linkage reaches the maximal distance 1.0 (rows sharing no "
                       f"column) with {below} clusters left for the {k} asked, so {unrelated} "
                       f"of {n} rows are grouped by the order of tied merges, not by "
                       f"similarity (largest cluster {largest} rows)")
        if identity:
            why.append("the order is the identity" + (
                f" (one cluster: DSB asks for max({n} // {size}, 1) = 1)" if k == 1 else ""))
        warnings.warn(DSBDegenerateWarning(
            f"dsb degenerates on the {n}x{X.shape[1]} matrix (panels of {size}): "
            + "; ".join(why), shape=X.shape, n_clusters=k, similar_clusters=below,
            unrelated_rows=unrelated, largest=largest, identity=identity), stacklevel=2)
    return perm


register(PartitionerSpec(
    "dsb", dsb,
    description="DSB baseline: complete linkage on cosine distance into max(n // b, 1) "
                "clusters, largest first"))
