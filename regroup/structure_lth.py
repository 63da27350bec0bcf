"""Structure-LTH "IMP-Regroup" block extraction (ICML'22), re-implemented as a baseline.

As described in the paper and its public code: the rows of the (conv-flattened) mask are
split into 8 parts by a hypergraph partitioner minimising the cut (hMETIS ``shmetis`` with
UBfactor 10 there; KaHyPar with the cut objective and the equivalent imbalance here). In each
part, columns are ranked by how many of the part's rows use them, and the column set grows
until its width exceeds 1.5 x every row's not-yet-covered nonzeros. The part's rows times
those columns form one dense block (split into 32-row pieces for the kernel: a multiple of
32 plus the remainder, which changes no area). Parts of at most 16 rows get no block.
Everything inside blocks is refilled, everything outside dropped. The block area is the
method's own: it is not a budget parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .metrics import retained
from .pattern import Pattern

__all__ = ["StructureLTH", "structure_lth", "UBFACTOR_EPSILON"]

# hMETIS UBfactor 10 lets every bisection go to 60/40; after log2(8) = 3 levels the largest
# part may hold 0.6^3 = 21.6 % of the rows, i.e. 1.728 x the balanced 12.5 %.
UBFACTOR_EPSILON = 0.6 ** 3 * 8 - 1


@dataclass(frozen=True, eq=False)
class StructureLTH:
    """Outcome of :func:`structure_lth` on one layer.

    Attributes
    ----------
    mask : ndarray of bool, shape (n_rows, n_cols)
        The refilled block mask in original coordinates.
    labels : ndarray of intp
        Part of every row.
    blocks : list of (rows, cols)
        One dense block per part that got one (original indices).
    retained, retained_magnitude : float
    area : int
        Positions covered by the blocks.
    kernel_blocks : int
        Number of row pieces (of at most ``piece`` rows) the blocks are cut into.
    """

    mask: np.ndarray
    labels: np.ndarray
    blocks: list
    retained: float
    retained_magnitude: float | None
    area: int
    kernel_blocks: int

    @property
    def density(self) -> float:
        return self.area / self.mask.size


def _part_block(B: sp.csr_matrix, rows: np.ndarray, widen: float) -> np.ndarray:
    """Columns of the block of one part: the most used columns, widened until the width
    exceeds ``widen`` x every row's uncovered nonzeros."""
    sub = B[rows]
    counts = np.asarray(sub.sum(axis=0)).ravel()
    used = np.flatnonzero(counts)
    if used.size == 0:
        return used
    order = used[np.argsort(-counts[used], kind="stable")]
    covered = np.cumsum(sub[:, order].toarray(), axis=1)            # rows x width
    uncovered = covered[:, -1:] - covered                           # nnz beyond width w
    widths = np.arange(1, order.size + 1)
    ok = widths > widen * uncovered.max(axis=0)
    w = int(np.argmax(ok)) + 1 if ok.any() else order.size
    return order[:w]


def structure_lth(pattern: Pattern, *, parts: int = 8, epsilon: float = UBFACTOR_EPSILON,
                  widen: float = 1.5, min_rows: int = 16, piece: int = 32, seed: int = 0,
                  time_limit: float | None = None) -> StructureLTH:
    """Run the Structure-LTH extractor on ``pattern``.

    Parameters
    ----------
    parts : int, default=8
        Number of row parts (the published code always uses 8).
    epsilon : float, default=UBFACTOR_EPSILON
        KaHyPar imbalance equivalent to hMETIS UBfactor 10 over three bisection levels.
    widen : float, default=1.5
    min_rows : int, default=16
        Parts with at most this many rows get no block.
    piece : int, default=32
        Row height of the kernel blocks the dense blocks are cut into.
    seed : int, default=0
    time_limit : float, optional
        Seconds allowed for the partitioner (it always runs in a subprocess).
    """
    from .partitioners import call_isolated

    B = pattern.binary()
    n, m = B.shape
    k = min(parts, n)
    labels = call_isolated("regroup.partitioners.kahypar:kahypar_labels", B,
                           {"k": int(k), "objective": "cut", "epsilon": float(epsilon)},
                           seed, time_limit, "Structure-LTH partitioner (kahypar)")
    labels = np.asarray(labels, np.intp)
    mask = np.zeros((n, m), dtype=bool)
    blocks, kernel_blocks = [], 0
    for p in np.unique(labels):
        rows = np.flatnonzero(labels == p)
        if rows.size <= min_rows:
            continue
        cols = _part_block(B, rows, widen)
        if cols.size == 0:
            continue
        mask[np.ix_(rows, cols)] = True
        blocks.append((rows, cols))
        kernel_blocks += -(-rows.size // piece)
    return StructureLTH(
        mask=mask, labels=labels, blocks=blocks, retained=retained(B, mask),
        retained_magnitude=retained(pattern.matrix, mask) if pattern.has_weights else None,
        area=int(mask.sum()), kernel_blocks=kernel_blocks)
