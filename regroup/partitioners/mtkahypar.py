"""Mt-KaHyPar (PyPI ``mtkahypar``) on the column-net hypergraph."""
from __future__ import annotations

import numpy as np

from ..validation import PartitionerError, missing_dependency, native_seed
from ..executors import thread_limit
from ..hypergraph import column_net
from .registry import PartitionerSpec, register
from ._panels import labels_to_perm, n_panels

PRESETS = ("deterministic", "default", "quality", "highest_quality")
OBJECTIVES = ("km1", "cut")
_INITIALIZER = None


def _initializer():
    # Mt-KaHyPar's thread pool is process-global and can be initialised once, so it takes
    # the thread cap of the first call: a worker process gets its share of the cores.
    global _INITIALIZER
    if _INITIALIZER is None:
        import mtkahypar
        _INITIALIZER = mtkahypar.initialize(thread_limit(), False)
    return _INITIALIZER


def mtkahypar_partition(X, size: int, *, rng: np.random.Generator,
                        preset: str = "deterministic", objective: str = "km1",
                        epsilon: float = 0.03) -> np.ndarray:
    """Partition rows with Mt-KaHyPar, then repair block sizes.

    The DETERMINISTIC preset gives identical results across runs and thread counts (it
    ignores the seed); the others take the seed but are not reproducible.
    """
    try:
        import mtkahypar
    except ImportError:
        raise missing_dependency("mtkahypar", "partitioner 'mtkahypar'") from None
    n = X.shape[0]
    k = n_panels(n, size)
    hg = column_net(X)
    if k <= 1 or hg.n_nets == 0:
        return np.arange(n, dtype=np.intp)
    init = _initializer()
    mtkahypar.set_seed(native_seed(rng))
    ctx = init.context_from_preset(getattr(mtkahypar.PresetType, preset.upper()))
    ctx.set_partitioning_parameters(k, float(epsilon), getattr(mtkahypar.Objective,
                                                                objective.upper()))
    ctx.logging = False
    nets = np.split(hg.pins, hg.net_ptr[1:-1])
    try:
        graph = init.create_hypergraph(ctx, n, hg.n_nets, nets)
        part = graph.partition(ctx)
    except (mtkahypar.InvalidInputError, mtkahypar.InvalidParameterError,
            mtkahypar.SystemError) as exc:
        raise PartitionerError(f"mtkahypar failed: {exc}") from exc
    labels = np.asarray(part.get_partition(), dtype=np.intp)
    return labels_to_perm(labels, size, X, who="mtkahypar")


register(PartitionerSpec(
    "mtkahypar", mtkahypar_partition,
    params={"preset": "deterministic", "objective": "km1", "epsilon": 0.03},
    choices={"preset": PRESETS, "objective": OBJECTIVES}, requires=("mtkahypar",),
    deterministic=True,
    description="Mt-KaHyPar k-way (km1 or cut, DETERMINISTIC preset) on the column-net "
                "hypergraph"))
