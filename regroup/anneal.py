"""Simulated annealing over the row panels: an optional polish after refinement.

:func:`regroup.refine.refine` climbs to a local optimum by exact block-coordinate steps;
annealing can leave it. A move swaps two rows between panels (panel sizes stay exact)
and is scored incrementally as the format scores a layout: in the grid format the mass of
every (panel, column group) block, in the shuffled format each panel's columns ranked by
mass and cut into ``bc``-wide tiles; the layout's worth is the mass of its ``k`` best
blocks, ``k`` being the number the starting layout keeps. Moves are accepted by the
Metropolis rule with the temperature falling geometrically from 3 to 0.05 times the mean
nonzero mass. The best state is re-scored exactly (:func:`regroup.blocks.build_layout`
under the real budget) and returned only if it keeps more than the start.

Deterministic for a seed: ``seconds`` is turned into a number of moves by a fixed cost
model (:func:`moves_for`, calibrated on the reference machine: 2 x86_64 cores), not by the
clock, so every machine makes the same moves; a slower machine takes longer.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .blocks import Budget, Layout, build_layout, positions

__all__ = ["anneal", "moves_for"]

# Seconds per move on the reference machine: a fixed Python overhead per format plus the
# element work of re-ranking two panels and all blocks (measured on DLMC matrices from
# 256x2304 to 2048x512 at b=32; within 25 % of the model).
_MOVE_SECONDS = {"grid": 1.4e-4, "shuffled": 2.7e-4}
_ELEMENT_SECONDS = 1.0e-9
# Moves are drawn and tested in batches of this many (one rng call per batch).
_BATCH = 256


def moves_for(seconds: float, shape: tuple[int, int], block: tuple[int, int],
              fmt: str) -> int:
    """The number of moves ``seconds`` buys for a matrix of ``shape`` (the work model)."""
    n, m = shape
    br, bc = block
    panels, groups = -(-n // br), -(-m // bc)
    work = panels * groups + (2 * m * max(1.0, math.log2(m)) if fmt == "shuffled"
                              else 2 * groups)
    return max(1, int(seconds / (_MOVE_SECONDS[fmt] + _ELEMENT_SECONDS * work)))


class _Blocks:
    """The block table of a row-to-panel assignment, updated move by move."""

    def __init__(self, V: sp.csr_matrix, panel: np.ndarray, n_panels: int, lay: Layout):
        self.fmt = lay.format
        self.bc = lay.block_shape[1]
        m = V.shape[1]
        if self.fmt == "grid":
            group = positions(lay.col_perm) // self.bc
            n_groups = -(-m // self.bc)
            # Each row's mass per column group: the unit a row moves.
            # A copy: summing duplicates works in place and V is the caller's.
            self.rows = sp.csr_matrix((V.data.copy(), group[V.indices], V.indptr.copy()),
                                      shape=(V.shape[0], n_groups))
            self.rows.sum_duplicates()
        else:
            self.rows = V
            n_groups = -(-m // self.bc)
        self.rows = self.rows.tocsr()
        self.ptr, self.idx, self.val = self.rows.indptr, self.rows.indices, self.rows.data
        width = self.rows.shape[1]
        coo = self.rows.tocoo()
        self.sums = np.bincount(panel[coo.row] * width + coo.col, weights=coo.data,
                                minlength=n_panels * width).reshape(n_panels, width)
        self.n_groups = n_groups
        self.table = np.stack([self._tiles(p) for p in range(n_panels)])

    def _tiles(self, p: int) -> np.ndarray:
        if self.fmt == "grid":
            return self.sums[p].copy()
        s = np.sort(self.sums[p])[::-1]
        padded = np.zeros(self.n_groups * self.bc)
        padded[:s.size] = s
        return padded.reshape(self.n_groups, self.bc).sum(axis=1)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.ptr[r], self.ptr[r + 1]
        return self.idx[lo:hi], self.val[lo:hi]

    def swap(self, r1: int, a: int, r2: int, b: int) -> None:
        """Row ``r1`` leaves panel ``a`` for ``b``, row ``r2`` the other way (a row's
        column indices are unique, so each fancy-indexed update is exact)."""
        c1, v1 = self.row(r1)
        c2, v2 = self.row(r2)
        self.sums[a, c1] -= v1
        self.sums[b, c1] += v1
        self.sums[b, c2] -= v2
        self.sums[a, c2] += v2
        self.table[a] = self._tiles(a)
        self.table[b] = self._tiles(b)


def _top(table: np.ndarray, k: int) -> float:
    flat = table.ravel()
    if k >= flat.size:
        return float(flat.sum())
    return float(np.partition(flat, flat.size - k)[flat.size - k:].sum())


def anneal(V: sp.csr_matrix, layout: Layout, budget: Budget, nnz: int, *, seconds: float,
           seed: int) -> Layout:
    """Anneal the row panels of ``layout`` for the objective ``V`` (values = mass).

    Returns a layout keeping at least the start's mass under ``budget`` (the start itself
    when annealing finds nothing better). The column order (grid) stays as it is; refine
    the result to re-fit it. ``seconds`` sets the number of moves through the work model
    (:func:`moves_for`); the result depends only on the inputs and ``seed``.
    """
    V = sp.csr_matrix(V)
    n = V.shape[0]
    br = layout.block_shape[0]
    n_panels = -(-n // br)
    k = layout.kept_blocks
    if n_panels < 2 or k == 0 or V.nnz == 0:
        return layout
    panel = positions(layout.row_perm) // br
    blocks = _Blocks(V, panel, n_panels, layout)
    scale = float(np.abs(V.data).mean())
    hot, cold = 3.0 * scale, 0.05 * scale
    total = moves_for(seconds, V.shape, layout.block_shape, layout.format)
    rng = np.random.default_rng(seed)
    cur = best = _top(blocks.table, k)
    best_panel = panel.copy()
    done = 0
    while done < total:
        size = min(_BATCH, total - done)
        pairs = rng.integers(0, n, size=(size, 2))
        accept = rng.random(size)
        for j, ((r1, r2), u) in enumerate(zip(pairs.tolist(), accept.tolist())):
            a, b = panel[r1], panel[r2]
            if a == b:
                continue
            temp = hot * (cold / hot) ** ((done + j) / total)
            blocks.swap(r1, a, r2, b)
            new = _top(blocks.table, k)
            if new >= cur or u < math.exp((new - cur) / temp):
                panel[r1], panel[r2] = b, a
                cur = new
                if cur > best * (1 + 1e-12):
                    best, best_panel = cur, panel.copy()
            else:
                blocks.swap(r1, b, r2, a)
        done += size
    # Rows by panel, keeping the starting order inside each panel (stable).
    row_perm = layout.row_perm[np.argsort(best_panel[layout.row_perm], kind="stable")]
    out = build_layout(V, row_perm.astype(np.intp), layout.col_perm, layout.block_shape,
                       layout.format, budget, nnz)
    return out if out.kept_mass > layout.kept_mass * (1 + 1e-12) else layout
