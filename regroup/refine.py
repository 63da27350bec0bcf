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

Bounds (tall or thin matrices in small blocks have many panels): a step whose value table
(rows x row panels, or columns x column groups) has more than ``MAX_STEP_CELLS`` cells is
left out, and the assignments of one :func:`refine` call stop once they have visited
``REFINE_WORK`` cells (counted, so deterministic). Either is said in ``notes`` (the engine
records them in the layer's ``metrics["bounds"]``); neither happens on the DLMC matrices.
"""
from __future__ import annotations

import time
from collections.abc import Collection, Hashable, Sequence

import numpy as np
import scipy.sparse as sp

from .assignment import Assigned, assign_within
from .blocks import (Budget, Layout, build_layout, group_sums, positions, row_group_sums,
                     summing_form)

__all__ = ["refine", "refine_shared", "warm_start", "step_bounds", "MAX_STEP_CELLS",
           "REFINE_WORK"]

# A step's value table and the assignment's working copies of it (about five) must stay
# small: 2**24 cells is 128 MiB a copy. 65536 rows in panels of 16 would need 2**28.
MAX_STEP_CELLS = 1 << 24
# Cells the assignments of one refine() call may visit (their work, counted): 6-12 s on
# 2 cores (11-23 ns a cell measured); the largest DLMC refinement measured visits 1.25e8,
# a quarter of it (rn50 final_dense, b=16).
REFINE_WORK = 1 << 29


def _panel_column_indicator(lay: Layout, m: int, dense: bool = False
                            ) -> sp.csr_matrix | np.ndarray:
    """(m, n_panels) 0/1: column c is kept by panel p (shuffled format); a dense array
    with ``dense`` (for a dense objective: cheaper to build than the sparse one)."""
    lengths = [len(c) for c in lay.panel_cols]
    cols = np.concatenate(lay.panel_cols) if lay.panel_cols else np.zeros(0, np.intp)
    panels = np.repeat(np.arange(len(lengths)), lengths)
    if dense:
        ind = np.zeros((m, len(lengths)))
        ind[cols, panels] = 1.0
        return ind
    return sp.csr_matrix((np.ones(cols.size), (cols, panels)), shape=(m, len(lengths)))


def _group_sums(M: sp.coo_matrix | np.ndarray, axis: int, perm: np.ndarray, size: int
                ) -> np.ndarray:
    """Dense (items x groups) sums of the matrix's mass: for axis 0, each row's mass per
    column group of ``perm``; for axis 1, each column's mass per row panel. A bincount
    over the nonzeros (much faster than the sparse product with a group indicator), or
    sums of the dense matrix's slices."""
    if isinstance(M, np.ndarray):
        return group_sums(M[:, perm], size, 1) if axis == 0 else \
            row_group_sums(M, perm, size).T
    k = -(-perm.size // size)
    pos = positions(perm)
    items, other = (M.row, M.col) if axis == 0 else (M.col, M.row)
    n_items = M.shape[axis]
    flat = items.astype(np.int64) * k + pos[other] // size
    return np.bincount(flat, weights=M.data, minlength=n_items * k).reshape(n_items, k)


class _Mass:
    """The objective matrix in the forms the steps read: what :func:`build_layout` sums
    (:func:`regroup.blocks.summing_form`: a dense float64 array, or COO), and CSR for
    the sparse products when it is not dense. ``V`` may already be that dense array."""

    def __init__(self, V: sp.spmatrix | np.ndarray):
        self.matrix = V
        if isinstance(V, np.ndarray):
            self.sums = V.astype(np.float64, copy=False)
        else:
            self.sums = summing_form(V)
        self.dense = self.sums if isinstance(self.sums, np.ndarray) else None
        self.csr = None if self.dense is not None else sp.csr_matrix(V)
        self.shape = self.sums.shape


def _row_values(V: _Mass, lay: Layout) -> np.ndarray:
    """(rows x panels) mass of row i on the kept columns of panel p."""
    if lay.format == "grid":
        return _group_sums(V.sums, 0, lay.col_perm, lay.block_shape[1]) @ \
            lay.kept.T.astype(float)
    if V.dense is not None:
        return V.dense @ _panel_column_indicator(lay, V.shape[1], dense=True)
    return (V.csr @ _panel_column_indicator(lay, V.shape[1])).toarray()


def _col_values(V: _Mass, lay: Layout) -> np.ndarray:
    """(columns x column groups) mass of column j on the kept blocks of group g (grid)."""
    return _group_sums(V.sums, 1, lay.row_perm, lay.block_shape[0]) @ lay.kept.astype(float)


def _rows_step(V: _Mass, lay: Layout, work: int) -> Assigned:
    return assign_within(_row_values(V, lay), lay.block_shape[0], start=lay.row_perm,
                         work_limit=work)


def _cols_step(V: _Mass, lay: Layout, work: int) -> Assigned:
    return assign_within(_col_values(V, lay), lay.block_shape[1], start=lay.col_perm,
                         work_limit=work)


def step_bounds(shape: tuple[int, int], block: tuple[int, int], fmt: str
                ) -> dict[str, str]:
    """The refinement steps left out for size, ``{"rows" or "cols": why}``: those whose
    value table (items x groups) has more than ``MAX_STEP_CELLS`` cells."""
    out = {}
    sides = (("rows", shape[0], block[0], "row panels"),
             ("cols", shape[1], block[1], "column groups"))
    for step, items, size, groups in sides:
        if step == "cols" and fmt != "grid":
            continue                         # shuffled panels pick their own columns
        k = -(-items // size)
        if items * k > MAX_STEP_CELLS:
            out[step] = (f"refine: the {step} step is left out: {items} {step} x {k} "
                         f"{groups} = {items * k} cells, above the limit of "
                         f"{MAX_STEP_CELLS} (regroup.refine.MAX_STEP_CELLS)")
    return out


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None and text not in notes:
        notes.append(text)


def _same_groups(a: np.ndarray, b: np.ndarray, size: int) -> bool:
    """Whether orders ``a`` and ``b`` put every item in the same group of ``size``
    consecutive slots (the blocks then hold the same entries, in another order)."""
    return bool(np.array_equal(positions(a) // size, positions(b) // size))


def refine(V: sp.spmatrix | np.ndarray, layout: Layout, budget: Budget, nnz: int, *,
           time_limit: float | None = None, max_rounds: int = 20,
           rows: bool = True, cols: bool = True, notes: list[str] | None = None,
           chosen: bool = False) -> Layout:
    """Improve ``layout`` for the objective ``V`` (values = mass; sparse, or the dense
    array :func:`regroup.blocks.summing_form` gives) under ``budget``.

    Returns a layout whose kept mass is >= the input's (the input itself when nothing
    improves). The search is deterministic; ``time_limit`` (seconds) is a safety cap that
    stops it between steps, which makes the result depend on the machine's speed.
    ``rows`` / ``cols`` False keep that order fixed (a permutation folded into a
    neighbouring layer must not move); only the kept blocks are re-picked then.
    Steps above ``MAX_STEP_CELLS`` are left out and the work stops at ``REFINE_WORK``
    (:func:`step_bounds`); why is appended to ``notes`` when given. ``chosen``: the
    layout's blocks are :func:`build_layout`'s choice for its orders (as a layout it
    built is), so a step that moves no row (column) to another panel (group) need not
    choose them again (the same result, up to the rounding of block sums taken in
    another order, which could only tip a near-tie).
    """
    mass = _Mass(V)
    n, m = mass.shape
    block = layout.block_shape
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    best, best_score = layout, layout.kept_mass
    wanted = (["rows"] if rows else []) + (["cols"] if cols and layout.format == "grid"
                                           else [])
    bounded = step_bounds((n, m), block, layout.format)
    for step in wanted:
        if step in bounded:
            _note(notes, bounded[step])
    steps = [step for step in wanted if step not in bounded]
    work = REFINE_WORK
    for _ in range(max_rounds):
        improved = False
        if not steps:
            break
        for step in steps:
            if deadline is not None and time.perf_counter() > deadline:
                return best
            if step == "rows":
                done = _rows_step(mass, best, work)
                same = _same_groups(done.perm, best.row_perm, block[0])
                rows_, cols_ = done.perm, best.col_perm
            else:
                done = _cols_step(mass, best, work)
                same = _same_groups(done.perm, best.col_perm, block[1])
                rows_, cols_ = best.row_perm, done.perm
            work -= done.work
            # The same groups as best's: their blocks hold the same mass (up to rounding),
            # and best's are the chosen ones, so choosing again cannot gain.
            if not (same and chosen):
                cand = build_layout(mass.sums, rows_, cols_, block, best.format, budget, nnz)
                score = cand.kept_mass
                if score > best_score * (1 + 1e-12) + 1e-12:
                    best, best_score, improved = cand, score, True
                # Either way, best's blocks are now a choice for its groups: the new
                # best was chosen, and one choice for the same groups did not beat it.
                chosen = chosen or same or improved
            if work <= 0:
                _note(notes, f"refine: stopped when its work bound was spent ({REFINE_WORK} "
                             "cells visited by its assignments, regroup.refine.REFINE_WORK)")
                return best
        if not improved:
            break
    return best


def warm_start(V: sp.spmatrix | np.ndarray, row_perm: np.ndarray,
               col_perm: np.ndarray | None, block: tuple[int, int], fmt: str,
               budget: Budget, nnz: int, *, rounds: int, rows: bool = True,
               cols: bool = True, time_limit: float | None = None,
               notes: list[str] | None = None) -> tuple[Layout, Layout]:
    """A layout of ``V`` started from given orders: the blocks chosen for them
    (:func:`build_layout`), then at most ``rounds`` rounds of :func:`refine` (``rows`` /
    ``cols`` False keep that order fixed). Returns ``(start, result)``; the result keeps
    at least the start's mass. ``V`` as for :func:`refine` (the dense array of
    :func:`regroup.blocks.summing_form` saves its conversion)."""
    start = build_layout(V, row_perm, col_perm, block, fmt, budget, nnz)
    if not (rows or (cols and fmt == "grid")):
        rounds = 0                       # every order fixed: the blocks only
    lay = (refine(V, start, budget, nnz, max_rounds=rounds, rows=rows, cols=cols,
                  time_limit=time_limit, notes=notes, chosen=True) if rounds else start)
    return start, lay


def refine_shared(layers: Sequence[tuple[sp.spmatrix, Layout, Budget, int]],
                  rows: Sequence[Hashable | None], cols: Sequence[Hashable | None], *,
                  frozen: Collection[Hashable] = (), max_rounds: int = 10,
                  time_limit: float | None = None, notes: list[str] | None = None
                  ) -> list[Layout]:
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

    Bounds as :func:`refine`: a shared order whose value table has more than
    ``MAX_STEP_CELLS`` cells stays as it is, and its assignments stop after ``REFINE_WORK``
    cells visited in all; why is appended to ``notes`` when given.
    """
    n_layers = len(layers)
    if not (len(rows) == len(cols) == n_layers):
        raise ValueError("refine_shared: 'layers', 'rows' and 'cols' differ in length")
    masses = [_Mass(V) for V, _, _, _ in layers]
    weights = [1.0 / (float(V.sums.sum()) or 1.0) for V in masses]
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
        new = build_layout(masses[i].sums, row_perm, col_perm, lay.block_shape, lay.format, budget,
                           nnz)
        own_rows, own_cols = rows[i] is None, cols[i] is None and lay.format == "grid"
        if own_rows or own_cols:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            new = refine(masses[i].matrix, new, budget, nnz, rows=own_rows, cols=own_cols,
                         max_rounds=2, time_limit=left, notes=notes)
        return new

    n_items = {}
    for i, lay in enumerate(lays):
        for key, axis in ((rows[i], 0), (cols[i], 1)):
            if key is not None:
                n_items[key] = lay.shape[axis]
    too_big = set()
    for key, (_, size) in keys.items():
        k = -(-n_items[key] // size)
        if key not in frozen and n_items[key] * k > MAX_STEP_CELLS:
            too_big.add(key)
            _note(notes, f"refine_shared: order {key!r} is left as it is: {n_items[key]} "
                         f"items x {k} groups = {n_items[key] * k} cells, above the limit "
                         f"of {MAX_STEP_CELLS} (regroup.refine.MAX_STEP_CELLS)")
    work = REFINE_WORK
    best = score(lays)
    for _ in range(max_rounds):
        improved = False
        for key, (_, size) in list(keys.items()):
            if key in frozen or key in too_big:
                continue
            if work <= 0:
                _note(notes, f"refine_shared: stopped when its work bound was spent "
                             f"({REFINE_WORK} cells visited by its assignments, "
                             "regroup.refine.REFINE_WORK)")
                return lays
            if deadline is not None and time.perf_counter() > deadline:
                return lays
            members = [(i, 0) for i in range(n_layers) if rows[i] == key] + \
                      [(i, 1) for i in range(n_layers) if cols[i] == key]
            values = sum(weights[i] * (_row_values(masses[i], lays[i]) if axis == 0
                                       else _col_values(masses[i], lays[i]))
                         for i, axis in members)
            done = assign_within(values, size, start=keys[key][0], work_limit=work)
            work -= done.work
            perm = done.perm
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
