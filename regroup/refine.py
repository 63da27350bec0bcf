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
from collections.abc import Collection, Hashable, Sequence

import numpy as np
import scipy.sparse as sp

from .assignment import assign
from .blocks import Budget, Layout, build_layout, positions

__all__ = ["refine", "refine_shared"]


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


def _row_values(V: sp.csr_matrix, coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    """(rows x panels) mass of row i on the kept columns of panel p."""
    if lay.format == "grid":
        return _group_sums(coo, 0, lay.col_perm, lay.block_shape[1]) @ lay.kept.T.astype(float)
    return (V @ _panel_column_indicator(lay, V.shape[1])).toarray()


def _col_values(coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    """(columns x column groups) mass of column j on the kept blocks of group g (grid)."""
    return _group_sums(coo, 1, lay.row_perm, lay.block_shape[0]) @ lay.kept.astype(float)


def _rows_step(V: sp.csr_matrix, coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    return assign(_row_values(V, coo, lay), lay.block_shape[0], start=lay.row_perm)


def _cols_step(coo: sp.coo_matrix, lay: Layout) -> np.ndarray:
    return assign(_col_values(coo, lay), lay.block_shape[1], start=lay.col_perm)


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


def refine_shared(layers: Sequence[tuple[sp.spmatrix, Layout, Budget, int]],
                  rows: Sequence[Hashable | None], cols: Sequence[Hashable | None], *,
                  frozen: Collection[Hashable] = (), max_rounds: int = 10,
                  time_limit: float | None = None) -> list[Layout]:
    """Improve orders that several layers share (a hidden dimension folded into all of
    them), for the sum of the layers' retained fractions.

    ``layers[i] = (V, layout, budget, nnz)`` as for :func:`refine`; ``rows[i]`` /
    ``cols[i]`` name the shared order (any hashable key) that is layer i's row / column
    order, or None when that side is the layer's own. Layers sharing an order must hold
    it already (equal ``row_perm`` / ``col_perm``) and have the same block size along it.
    The orders named in ``frozen`` stay as they are (shared with something this search
    cannot move, e.g. a convolution reading each feature as several columns).

    Block-coordinate ascent, as :func:`refine` but across layers: for one shared order,
    with every layer's kept blocks fixed, the value of putting feature i in group g is
    the sum over its layers of i's mass there (each layer scaled by its total, so each
    counts by its retained fraction); the exact assignment gives the new order, every
    layer re-picks its blocks, and a layer's own sides are refined after it. A step is
    kept only when the sum rises, so the result never ends below its start (a single
    layer may). Returns the layouts, in the order of ``layers``.
    """
    n_layers = len(layers)
    if not (len(rows) == len(cols) == n_layers):
        raise ValueError("refine_shared: 'layers', 'rows' and 'cols' differ in length")
    Vs = [sp.csr_matrix(V) for V, _, _, _ in layers]
    coos = [V.tocoo() for V in Vs]
    weights = [1.0 / (float(V.sum()) or 1.0) for V in Vs]
    lays = [lay for _, lay, _, _ in layers]
    keys: dict = {}
    for i, lay in enumerate(lays):
        for key, axis in ((rows[i], 0), (cols[i], 1)):
            if key is None:
                continue
            if axis == 1 and lay.format != "grid":
                raise ValueError(f"refine_shared: layer {i} shares its columns, which only "
                                 "the grid format orders")
            perm = lay.row_perm if axis == 0 else lay.col_perm
            size = lay.block_shape[axis]
            if key in keys and (keys[key][1] != size
                                or not np.array_equal(keys[key][0], perm)):
                raise ValueError(f"refine_shared: the layers sharing order {key!r} disagree "
                                 "on it or on its block size")
            keys.setdefault(key, (perm, size))
    deadline = None if time_limit is None else time.perf_counter() + time_limit

    def score(ls: list[Layout]) -> float:
        return sum(w * lay.kept_mass for w, lay in zip(weights, ls))

    def relaid(i: int, lay: Layout, row_perm, col_perm) -> Layout:
        _, _, budget, nnz = layers[i]
        new = build_layout(coos[i], row_perm, col_perm, lay.block_shape, lay.format, budget,
                           nnz)
        own_rows, own_cols = rows[i] is None, cols[i] is None and lay.format == "grid"
        if own_rows or own_cols:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            new = refine(Vs[i], new, budget, nnz, rows=own_rows, cols=own_cols, max_rounds=2,
                         time_limit=left)
        return new

    best = score(lays)
    for _ in range(max_rounds):
        improved = False
        for key, (_, size) in list(keys.items()):
            if key in frozen:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                return lays
            members = [(i, 0) for i in range(n_layers) if rows[i] == key] + \
                      [(i, 1) for i in range(n_layers) if cols[i] == key]
            values = sum(weights[i] * (_row_values(Vs[i], coos[i], lays[i]) if axis == 0
                                       else _col_values(coos[i], lays[i]))
                         for i, axis in members)
            perm = assign(values, size, start=keys[key][0])
            if np.array_equal(perm, keys[key][0]):
                continue
            trial = list(lays)
            for i, axis in members:
                lay = trial[i]
                trial[i] = relaid(i, lay, perm if axis == 0 else lay.row_perm,
                                  perm if axis == 1 else lay.col_perm)
            got = score(trial)
            if got > best * (1 + 1e-12) + 1e-12:
                lays, best, improved = trial, got, True
                keys[key] = (perm, size)
        if not improved:
            break
    return lays
