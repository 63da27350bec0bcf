"""Agglomerative clustering of rows on Jaccard distance; the leaf order is cut into panels."""
from __future__ import annotations

import numpy as np

from .._validation import PartitionerError, missing_dependency
from ..similarity import jaccard
from .registry import PartitionerSpec, register

LINKAGES = ("average", "complete", "single", "weighted")
BACKENDS = ("scipy", "fastcluster")
# The condensed distance matrix has n*(n-1)/2 float64 entries: 1.6 GB at 20,000 rows.
MAX_ROWS = 20_000


def hierarchical(X, size: int, *, rng=None, linkage: str = "average",
                 backend: str = "scipy") -> np.ndarray:
    """Dendrogram leaf order of ``linkage`` clustering on ``1 - jaccard``.

    Consecutive leaves are the most similar rows, so cutting the leaf order into chunks
    of ``size`` gives exact panel sizes without any repair. Deterministic: ties are
    resolved by the linkage implementation in index order.
    """
    n = X.shape[0]
    if n > MAX_ROWS:
        raise PartitionerError(f"hierarchical clustering needs O(n^2) memory and is limited to "
                               f"{MAX_ROWS} rows (got {n}); use method 'metis' instead")
    if n < 3:
        return np.arange(n, dtype=np.intp)
    from scipy.cluster.hierarchy import leaves_list
    from scipy.spatial.distance import squareform

    D = np.clip(1.0 - jaccard(X), 0.0, None)   # rounding can leave -1e-16
    np.fill_diagonal(D, 0.0)
    condensed = squareform(D, checks=False)
    if backend == "fastcluster":
        try:
            import fastcluster
        except ImportError:
            raise missing_dependency("fastcluster", "hierarchical:backend=fastcluster") from None
        Z = fastcluster.linkage(condensed, method=linkage)
    else:
        from scipy.cluster.hierarchy import linkage as scipy_linkage
        Z = scipy_linkage(condensed, method=linkage)
    return leaves_list(Z).astype(np.intp)


register(PartitionerSpec(
    "hierarchical", hierarchical, params={"linkage": "average", "backend": "scipy"},
    choices={"linkage": LINKAGES, "backend": BACKENDS},
    description="agglomerative clustering on Jaccard distance, leaf order cut into panels"))
