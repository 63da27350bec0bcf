"""The identity ordering: rows stay where they are (the no-regrouping baseline)."""
from __future__ import annotations

import numpy as np

from .registry import PartitionerSpec, register


def identity(X, size: int, *, rng=None) -> np.ndarray:
    """Return ``arange(n)``: panels are consecutive rows of the original matrix."""
    return np.arange(X.shape[0], dtype=np.intp)


register(PartitionerSpec("identity", identity, columns="self",
                         description="natural order (baseline)"))
