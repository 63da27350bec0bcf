"""DSB "shuffled blocks" row grouping (NeurIPS'22), re-implemented as a baseline.

As in the published method's public code: rows are compared by 1 - cosine similarity of
their binary patterns, clustered by complete linkage into ``ceil(n/b)`` clusters, and the
clusters, largest first, are concatenated and cut into panels of ``b`` rows. The tiles are
then chosen per panel as in regroup's shuffled format (columns ranked by count, or by
``sum |w|`` where the published code uses the weight norm).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validation import PartitionerError
from . import PartitionerSpec, register
from ._panels import n_panels
from .hierarchical import MAX_ROWS


def dsb(X, size: int, *, rng=None) -> np.ndarray:
    """Complete-linkage clusters on cosine distance, concatenated largest first."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = X.shape[0]
    if n > MAX_ROWS:
        raise PartitionerError(f"dsb needs O(n^2) memory and is limited to {MAX_ROWS} rows "
                               f"(got {n})")
    k = n_panels(n, size)
    if k <= 1 or n < 3:
        return np.arange(n, dtype=np.intp)
    B = sp.csr_matrix(X, dtype=np.float64)
    B.data[:] = 1.0
    norms = np.sqrt(np.asarray(B.sum(axis=1)).ravel())
    S = (B @ B.T).toarray()
    denom = np.outer(norms, norms)
    cos = np.divide(S, denom, out=np.zeros_like(S), where=denom > 0)
    D = np.clip(1.0 - cos, 0.0, None)      # rounding can leave -1e-16
    np.fill_diagonal(D, 0.0)
    labels = fcluster(linkage(squareform(D, checks=False), method="complete"), t=k,
                      criterion="maxclust")
    sizes = np.bincount(labels)
    # Largest cluster first; ties by label, members in index order.
    return np.lexsort((np.arange(n), labels, -sizes[labels])).astype(np.intp)


register(PartitionerSpec(
    "dsb", dsb,
    description="DSB baseline: complete linkage on cosine distance into n/b clusters, "
                "largest first"))
