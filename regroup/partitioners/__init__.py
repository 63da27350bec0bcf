"""Partitioners: group the rows of a matrix into consecutive panels of equal size.

Every partitioner is one function ``func(X, size, *, rng, **params) -> perm`` where ``X`` is a
nonnegative sparse matrix whose rows are the items to group, and ``perm[i]`` is the item placed
at position ``i``; panel ``p`` is ``perm[p*size:(p+1)*size]`` (the last may be short).
A spec records what the function needs and promises; ``auto`` is a portfolio of other
partitioners scored by the objective (see :mod:`regroup.engine`).

Index
-----
identity      -- natural order (the baseline every method must beat)
random        -- uniformly random order (a null control)
sort          -- rows by decreasing mass
hierarchical  -- agglomerative clustering on Jaccard distance, leaf order cut into panels
metis         -- pymetis k-way on the shared-count or Jaccard row graph
kahypar       -- KaHyPar (PyPI wheel) on the column-net hypergraph, in a subprocess
mtkahypar     -- Mt-KaHyPar on the column-net hypergraph
dsb           -- the DSB (NeurIPS'22) baseline: complete-linkage cosine clusters, largest first
auto          -- portfolio of the strong cheap ones, best retained mass wins
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..validation import PartitionerError
from ._isolate import call_isolated, run_isolated
from ._panels import check_perm
from .registry import (PartitionerSpec, available_partitioners, format_method,
                       get_partitioner, list_partitioners, parse_method, register)

__all__ = ["PartitionerSpec", "register", "get_partitioner", "list_partitioners",
           "available_partitioners", "parse_method", "format_method", "run_partitioner",
           "call_isolated", "check_perm"]


def run_partitioner(name: str, params: dict, X: sp.csr_matrix, size: int,
                    rng: np.random.Generator, time_limit: float | None) -> np.ndarray:
    """Run partitioner ``name`` on the rows of ``X`` (panels of ``size``) and return its
    validated ordering. Isolated partitioners, and any with a ``time_limit``, run in a
    subprocess. A failure the partitioner's library documents (``spec.failures``) is
    reported as a :class:`PartitionerError`; any other exception is a bug and propagates."""
    spec = get_partitioner(name)
    X = sp.csr_matrix(X)
    if X.nnz:
        data = X.data
        problem = ("NaN" if np.isnan(data).any() else "infinite" if np.isinf(data).any()
                   else "negative" if (data < 0).any() else None)
        if problem is not None:
            raise ValueError(f"partitioner {name!r} needs finite nonnegative values; the "
                             f"{X.shape[0]}x{X.shape[1]} matrix has {problem} entries")
    if spec.isolated or time_limit is not None:
        perm = run_isolated(name, X, size, params, int(rng.integers(0, 2**31 - 1)), time_limit)
    else:
        try:
            perm = spec.func(X, size, rng=rng, **params)
        except PartitionerError:
            raise
        except spec.failures as exc:
            raise PartitionerError(f"partitioner {name!r} failed: {type(exc).__name__}: "
                                   f"{exc}") from exc
    return check_perm(perm, X.shape[0], f"partitioner {name!r}")


# Registration: each backend module registers itself on import.
from . import (auto, dsb, hierarchical, identity, kahypar, metis, mtkahypar,  # noqa: E402,F401
               random_order, sort)
