"""KaHyPar (PyPI ``kahypar`` wheel) on the column-net hypergraph.

The wheel ships no configuration, so regroup writes its own .ini (direct k-way, km1 or cut,
FM refinement). The wheel calls ``exit()`` on bad input, so this partitioner always runs in
a subprocess (``isolated=True``). It minimises km1/cut, which is not retained mass: it is
here as a reference point, scored by the same objective as everything else.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..validation import missing_dependency, native_seed
from ..hypergraph import column_net
from .registry import PartitionerSpec, register
from ._panels import labels_to_perm, n_panels

OBJECTIVES = ("km1", "cut")


def _ini(objective: str, seed: int) -> str:
    refine = "kway_fm_km1" if objective == "km1" else "kway_fm"
    settings = {
        # general; vcycles=0 keeps run time bounded
        "mode": "direct", "objective": objective, "seed": seed, "cmaxnet": 1000,
        "vcycles": 0,
        # preprocessing
        "p-use-sparsifier": "false", "p-detect-communities": "true",
        "p-detect-communities-in-ip": "true", "p-reuse-communities": "false",
        "p-max-louvain-pass-iterations": 100, "p-min-eps-improvement": 0.0001,
        "p-louvain-edge-weight": "hybrid", "p-large-he-threshold": 1000,
        "p-smallest-maxnet-threshold": 50000, "p-maxnet-removal-factor": 0.01,
        # coarsening
        "c-type": "ml_style", "c-s": 1, "c-t": 160, "c-rating-score": "heavy_edge",
        "c-rating-use-communities": "true", "c-rating-heavy_node_penalty": "no_penalty",
        "c-rating-acceptance-criterion": "best_prefer_unmatched",
        "c-fixed-vertex-acceptance-criterion": "fixed_vertex_allowed",
        # initial partitioning
        "i-mode": "recursive", "i-technique": "multi", "i-c-type": "ml_style", "i-c-s": 1,
        "i-c-t": 150, "i-c-rating-score": "heavy_edge", "i-c-rating-use-communities": "true",
        "i-c-rating-heavy_node_penalty": "no_penalty",
        "i-c-rating-acceptance-criterion": "best_prefer_unmatched",
        "i-c-fixed-vertex-acceptance-criterion": "fixed_vertex_allowed",
        "i-algo": "pool", "i-runs": 20, "i-bp-algorithm": "worst_fit",
        "i-bp-heuristic-prepacking": "false", "i-bp-early-restart": "true",
        "i-bp-late-restart": "true", "i-r-type": "twoway_fm", "i-r-runs": -1,
        "i-r-fm-stop": "simple", "i-r-fm-stop-i": 50,
        # refinement
        "r-type": refine, "r-runs": -1, "r-fm-stop": "adaptive_opt", "r-fm-stop-alpha": 1,
        "r-fm-stop-i": 350,
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def kahypar_labels(X, *, rng: np.random.Generator, k: int, objective: str = "km1",
                   epsilon: float = 0.03) -> np.ndarray:
    """Part labels of the rows of ``X`` from KaHyPar (k parts within ``epsilon``
    imbalance; the wheel may exceed it). Runs in-process: call it through
    :func:`~regroup.partitioners._isolate.call_isolated`."""
    try:
        import kahypar
    except ImportError:
        raise missing_dependency("kahypar", "partitioner 'kahypar'") from None
    n = X.shape[0]
    hg = column_net(X)
    if k <= 1 or hg.n_nets == 0:
        return np.arange(n, dtype=np.intp) * k // max(n, 1)
    seed = native_seed(rng)
    h = kahypar.Hypergraph(n, hg.n_nets, hg.net_ptr.astype(np.int64).tolist(),
                           hg.pins.astype(np.int64).tolist(), k,
                           [1] * hg.n_nets, [1] * n)
    with tempfile.TemporaryDirectory(prefix="regroup-kahypar-") as tmp:
        ini = os.path.join(tmp, "regroup.ini")
        with open(ini, "w") as f:
            f.write(_ini(objective, seed))
        ctx = kahypar.Context()
        ctx.loadINIconfiguration(ini)
        ctx.setK(k)
        ctx.setEpsilon(float(epsilon))
        ctx.setSeed(seed)
        ctx.suppressOutput(True)
        kahypar.partition(h, ctx)
    return np.fromiter((h.blockID(i) for i in range(n)), dtype=np.intp, count=n)


def kahypar_partition(X, size: int, *, rng: np.random.Generator, objective: str = "km1",
                      epsilon: float = 0.03) -> np.ndarray:
    """Partition rows into ``ceil(n/size)`` blocks minimising ``objective`` over the nets
    (columns), then repair block sizes. Call it through the registry, which isolates it."""
    k = n_panels(X.shape[0], size)
    if k <= 1:
        return np.arange(X.shape[0], dtype=np.intp)
    labels = kahypar_labels(X, rng=rng, k=k, objective=objective, epsilon=epsilon)
    return labels_to_perm(labels, size, X, who="kahypar")


register(PartitionerSpec(
    "kahypar", kahypar_partition, params={"objective": "km1", "epsilon": 0.03},
    choices={"objective": OBJECTIVES}, requires=("kahypar",), isolated=True,
    description="KaHyPar k-way (km1 or cut) on the column-net hypergraph, in a subprocess"))
