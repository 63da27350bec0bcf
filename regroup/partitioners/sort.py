"""Rows sorted by decreasing mass (nnz, or |weight| sum): the cheapest structured baseline."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .registry import PartitionerSpec, register


def sort_by_mass(X, size: int, *, rng=None) -> np.ndarray:
    """Stable order by decreasing row mass, so dense rows share panels."""
    mass = np.asarray(sp.csr_matrix(X).sum(axis=1)).ravel()
    return np.argsort(-mass, kind="stable").astype(np.intp)


register(PartitionerSpec("sort", sort_by_mass, description="rows by decreasing mass"))
