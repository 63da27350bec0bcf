"""Agglomerative clustering of rows on Jaccard distance; the leaf order is cut into panels."""
from __future__ import annotations

import numpy as np

from ..validation import PartitionerError, missing_dependency
from ..similarity import DENSE_LIMIT, condensed_distance, jaccard
from .registry import PartitionerSpec, register

LINKAGES = ("average", "complete", "single", "weighted")
BACKENDS = ("scipy", "fastcluster")
# The condensed distance matrix has n*(n-1)/2 float64 entries and the linkage works on a
# copy of it: 2 x 268 MB at 8192 rows (it was 2 x 1.6 GB, plus the dense n x n similarity
# arrays, at the former 20,000). Above, the method is refused (auto records that and
# goes on with its other members).
MAX_ROWS = 8192


def hierarchical(X, size: int, *, rng=None, linkage: str = "average",
                 backend: str = "scipy") -> np.ndarray:
    """Dendrogram leaf order of ``linkage`` clustering on ``1 - jaccard``.

    Consecutive leaves are the most similar rows, so cutting the leaf order into chunks
    of ``size`` gives exact panel sizes without any repair. Deterministic: ties are
    resolved by the linkage implementation in index order.
    """
    n = X.shape[0]
    if n > MAX_ROWS:
        raise PartitionerError(f"hierarchical clustering needs O(n^2) memory and time and is "
                               f"limited to {MAX_ROWS} rows (regroup.partitioners."
                               f"hierarchical.MAX_ROWS; got {n}); use method 'metis' instead")
    if n < 3:
        return np.arange(n, dtype=np.intp)
    from scipy.cluster.hierarchy import leaves_list
    from scipy.spatial.distance import squareform

    if n <= DENSE_LIMIT:
        D = np.clip(1.0 - jaccard(X), 0.0, None)   # rounding can leave -1e-16
        np.fill_diagonal(D, 0.0)
        condensed = squareform(D, checks=False)
        del D
    else:
        # The same distances (bit for bit on count data) without the n x n arrays.
        condensed = condensed_distance(X)
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
