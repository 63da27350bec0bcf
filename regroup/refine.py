"""Local search that directly increases retained mass, starting from any layout.

Block-coordinate ascent with exact sub-steps:

1. With the kept columns of every panel fixed, the value of putting row ``i`` in panel
   ``p`` is its mass on those columns. Moving rows between panels of fixed sizes is then a
   transportation problem, solved exactly (:mod:`regroup.assignment`).
2. With the rows fixed, the kept blocks (tiles) are re-picked exactly (:func:`build_layout`).
3. Grid format: the same two steps for the columns (columns x column-group slots, with
   the kept blocks fixed), alternating with the rows.

Each step can only keep or raise the objective, so the search never ends below its start;
it stops when a round gains nothing or the time limit is reached.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from .assignment import assign
from .blocks import Budget, Layout, build_layout, positions

__all__ = ["refine"]


def _panel_column_indicator(lay: Layout, m: int) -> sp.csr_matrix:
    """(m, n_panels) 0/1: column c is kept by panel p (shuffled format)."""
    lengths = [len(c) for c in lay.panel_cols]
    cols = np.concatenate(lay.panel_cols) if lay.panel_cols else np.zeros(0, np.intp)
    panels = np.repeat(np.arange(len(lengths)), lengths)
    return sp.csr_matrix((np.ones(cols.size), (cols, panels)), shape=(m, len(lengths)))


def _group_sums(coo: sp.coo_matrix, axis: int, perm: np.ndarray, size: int) -> np.ndarray:
    """Dense (items x groups) sums of the matrix's mass: for axis 0, each row's mass per
    column group of ``perm``; for axis 1, each column's mass per row panel. A bincount
    over the nonzeros: much faster than the sparse product with a group indicator."""
    k = -(-perm.size // size)
    pos = positions(perm)
    items, other = (coo.row, coo.col) if axis == 0 else (coo.col, coo.row)
    n_items = coo.shape[axis]
    flat = items.astype(np.int64) * k + pos[other] // size
    return np.bincount(flat, weights=coo.data, minlength=n_items * k).reshape(n_items, k)


def _rows_step(V: sp.csr_matrix, coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    br, bc = lay.block_shape
    if lay.format == "grid":
        values = _group_sums(coo, 0, lay.col_perm, bc) @ lay.kept.T.astype(float)
    else:
        values = (V @ _panel_column_indicator(lay, V.shape[1])).toarray()
    return assign(values, br, start=lay.row_perm)


def _cols_step(coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    br, bc = lay.block_shape
    values = _group_sums(coo, 1, lay.row_perm, br) @ lay.kept.astype(float)
    return assign(values, bc, start=lay.col_perm)


def refine(V: sp.csr_matrix, layout: Layout, budget: Budget, nnz: int, *,
           time_limit: float | None = None, max_rounds: int = 20,
           rows: bool = True, cols: bool = True) -> Layout:
    """Improve ``layout`` for the objective ``V`` (values = mass) under ``budget``.

    Returns a layout whose kept mass is >= the input's (the input itself when nothing
    improves). The search is deterministic; ``time_limit`` (seconds) is a safety cap that
    stops it between steps, which makes the result depend on the machine's speed.
    ``rows`` / ``cols`` False keep that order fixed (a permutation folded into a
    neighbouring layer must not move); only the kept blocks are re-picked then.
    """
    V = sp.csr_matrix(V)
    coo = V.tocoo()
    n, m = V.shape
    block = layout.block_shape
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    best, best_score = layout, layout.kept_mass
    for _ in range(max_rounds):
        improved = False
        steps = (["rows"] if rows else []) + (["cols"] if cols and layout.format == "grid"
                                              else [])
        if not steps:
            break
        for step in steps:
            if deadline is not None and time.perf_counter() > deadline:
                return best
            if step == "rows":
                cand = build_layout(coo, _rows_step(V, coo, best), best.col_perm, block,
                                    best.format, budget, nnz)
            else:
                cand = build_layout(coo, best.row_perm, _cols_step(coo, best), block,
                                    best.format, budget, nnz)
            score = cand.kept_mass
            if score > best_score * (1 + 1e-12) + 1e-12:
                best, best_score, improved = cand, score, True
        if not improved:
            break
    return best
