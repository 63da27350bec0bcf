"""METIS (pymetis) k-way partitioning of the row similarity graph."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..validation import missing_dependency, native_seed
from ..similarity import METRICS, similarity_graph
from .registry import PartitionerSpec, register
from ._panels import labels_to_perm, n_panels, panel_sizes

# Jaccard similarities in (0, 1] become integer edge weights in [1, JACCARD_SCALE].
JACCARD_SCALE = 1000


def _integer_weights(G: sp.csr_matrix, metric: str) -> np.ndarray:
    data = G.data
    if metric == "jaccard" or not np.allclose(data, np.round(data)):
        top = data.max() if data.size else 1.0
        data = data * (JACCARD_SCALE / top)
    return np.maximum(np.round(data), 1).astype(np.int64)


def metis(X, size: int, *, rng: np.random.Generator, graph: str = "shared", knn: int = 0,
          ufactor: int = 1) -> np.ndarray:
    """Partition the row graph (``w_ij`` = shared mass or Jaccard) into ``ceil(n/size)``
    parts with k-way METIS, then repair part sizes to exactly ``size``.

    ``knn=0`` uses the dense graph up to 4096 rows and a 64-NN graph above (exact up to
    ``regroup.similarity.EXACT_KNN_ROWS`` rows, approximate above); a positive ``knn``
    always sparsifies. A graph without edges carries no information about which rows
    belong together, so the natural order is returned; so it is for panels of one row,
    which are the same panels in any order (and METIS, asked for as many parts as
    vertices, fails printing to stdout).
    """
    try:
        import pymetis
    except ImportError:
        raise missing_dependency("pymetis", "partitioner 'metis'") from None
    n = X.shape[0]
    k = n_panels(n, size)
    if k <= 1 or size == 1:
        return np.arange(n, dtype=np.intp)
    G = similarity_graph(X, graph, knn=knn or None)
    G.eliminate_zeros()
    if G.nnz == 0:
        return np.arange(n, dtype=np.intp)
    G.sort_indices()
    sizes = panel_sizes(n, size)
    opts = pymetis.Options(seed=native_seed(rng), ufactor=int(ufactor))
    adjacency = pymetis.CSRAdjacency(G.indptr.astype(np.int64), G.indices.astype(np.int64))
    _, parts = pymetis.part_graph(
        k, adjacency, eweights=_integer_weights(G, graph), tpwgts=(sizes / n).tolist(),
        recursive=False, options=opts)
    return labels_to_perm(np.asarray(parts), size, X, who="metis")


register(PartitionerSpec(
    "metis", metis, params={"graph": "shared", "knn": 0, "ufactor": 1},
    choices={"graph": METRICS}, requires=("pymetis",),
    failures=(RuntimeError, MemoryError),   # pymetis raises RuntimeError for METIS errors
    description="pymetis k-way on the shared-count or Jaccard row graph"))
