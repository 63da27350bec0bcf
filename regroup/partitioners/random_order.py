"""A uniformly random ordering: the null control for regrouping."""
from __future__ import annotations

import numpy as np

from .registry import PartitionerSpec, register


def random_order(X, size: int, *, rng: np.random.Generator) -> np.ndarray:
    """Return a permutation drawn from ``rng``."""
    return rng.permutation(X.shape[0]).astype(np.intp)


register(PartitionerSpec("random", random_order, columns="self",
                         description="random order (null control)"))
