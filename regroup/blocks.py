"""Block layouts: which ``br x bc`` blocks of the regrouped matrix are kept.

Two formats:

``grid``
    Plain BSR after a row permutation and a column permutation: the regrouped matrix
    ``M[row_perm][:, col_perm]`` is cut into a grid of ``br x bc`` blocks and whole blocks are
    kept.
``shuffled``
    After the row permutation, each row panel chooses its own columns, ``bc`` at a time:
    ``panel_cols[p]`` lists the original columns kept for panel ``p``, tile after tile.

Conventions: ``row_perm[i]`` is the original row at position ``i`` (so ``M[row_perm]`` is
regrouped); panel ``p`` holds positions ``p*br .. (p+1)*br - 1``. When a dimension is not a
multiple of the block, the last panel / column group / tile is short and its area counts
as what it covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .validation import RegroupError, check_choice, check_distinct_list
from .nm import check_nm_mask

__all__ = ["FORMATS", "MAX_TABLE_CELLS", "Budget", "Candidates", "Layout", "assemble",
           "build_layout", "candidates", "check_layout", "group_indicator", "layout_mask",
           "parse_budgets", "positions", "select", "select_blocks", "table_cells"]

FORMATS = ("grid", "shuffled")
# Candidate blocks one layout may hold in its tables (mass, area, the choice and its
# order: about 30 bytes each): at 2**24 a run stays under 1 GB (0.73-0.83 GB measured,
# 4096 x 4096 at 1x1, method sort). 1x1 blocks over an 8192 x 8192 layer (67M cells,
# 3.3 GB) are refused instead: they are unstructured sparsity anyway.
MAX_TABLE_CELLS = 1 << 24
BUDGET_KINDS = ("iso", "density", "blocks", "retained")


@dataclass(frozen=True)
class Budget:
    """How much block area may be kept.

    ``iso``: kept area <= input nnz (same storage as the unstructured mask); ``iso=F``:
    kept area <= F x input nnz (``iso=2`` is "2x area");
    ``density=d``: kept area <= d * n_rows * n_cols;
    ``blocks=k``: at most k blocks (tiles);
    ``retained=r``: the fewest blocks, best first, whose kept objective mass is >= r.
    """

    kind: str = "iso"
    value: float | None = None

    @classmethod
    def parse(cls, spec: "Budget | str") -> "Budget":
        """Read ``"iso"``, ``"iso=2"``, ``"density=0.1"``, ``"blocks=100"`` or
        ``"retained=0.9"``."""
        if isinstance(spec, Budget):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"The 'budget' parameter must be a str or Budget. Got {spec!r} "
                            "instead.")
        kind, _, value = spec.replace(":", "=").partition("=")
        kind = kind.strip()
        check_choice(kind, "budget", "Budget.parse", set(BUDGET_KINDS))
        if kind == "iso" and not value.strip():
            return cls("iso")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"The 'budget' parameter must look like '{kind}=NUMBER'. "
                             f"Got {spec!r} instead.") from None
        if kind == "iso":
            if not v > 0:
                raise ValueError(f"budget 'iso' needs a positive area factor. Got {spec!r} "
                                 "instead.")
            return cls("iso") if v == 1 else cls("iso", v)
        if kind == "blocks":
            if v < 1 or v != int(v):
                raise ValueError(f"budget 'blocks' needs a positive integer. Got {spec!r} "
                                 "instead.")
        elif not 0 < v <= 1:
            raise ValueError(f"budget {kind!r} needs a value in (0, 1]. Got {spec!r} instead.")
        return cls(kind, v)

    def __str__(self) -> str:
        if self.kind == "iso":
            return "iso" if self.value is None else f"iso={self.value:g}"
        v = int(self.value) if self.kind == "blocks" else self.value
        return f"{self.kind}={v}"


def parse_budgets(budgets: Any, name: str, caller: str) -> tuple[Budget, ...]:
    """Read a list of budgets: a comma-separated str (``"density=0.1,iso"``) or a sequence
    of str / :class:`Budget`. Errors name the parameter ``name`` of ``caller``; an empty
    list or a budget given twice (after normalisation: ``iso=1`` is ``iso``) is refused."""
    allowed = ("a non-empty list of distinct budgets, e.g. 'density=0.1,iso' or "
               "['density=0.1', 'iso']")
    return check_distinct_list(budgets, name, caller, allowed, Budget.parse, single=(Budget,))


@dataclass(frozen=True, eq=False)
class Layout:
    """A block layout of one matrix, in permuted coordinates.

    Attributes
    ----------
    format : {"grid", "shuffled"}
    block_shape : (int, int)
    row_perm : ndarray of intp, shape (n_rows,)
    col_perm : ndarray of intp, shape (n_cols,), or None for "shuffled"
    panel_cols : tuple of ndarray of intp, or None for "grid"
        Per panel, the kept original columns, tile by tile.
    kept : ndarray of bool
        "grid": (n_panels, n_groups) kept blocks; "shuffled": (n_panels, n_tiles) whether
        the panel's t-th best tile is kept.
    kept_area : int
    kept_mass : float
        Objective mass inside the kept blocks.
    """

    format: str
    block_shape: tuple[int, int]
    shape: tuple[int, int]
    row_perm: np.ndarray
    col_perm: np.ndarray | None
    panel_cols: tuple[np.ndarray, ...] | None
    kept: np.ndarray
    kept_area: int
    kept_mass: float

    @property
    def kept_blocks(self) -> int:
        return int(self.kept.sum())


def _sizes(n: int, b: int) -> np.ndarray:
    k = -(-n // b)
    s = np.full(k, b, dtype=np.int64)
    s[-1] = n - b * (k - 1)
    return s


def _budget_limits(budget: Budget, nnz: int, n: int, m: int):
    if budget.kind == "iso":
        return float(nnz) * (budget.value or 1.0), None
    if budget.kind == "density":
        return budget.value * n * m, None
    if budget.kind == "blocks":
        return None, int(budget.value)
    return None, None


def select_blocks(mass: np.ndarray, area: np.ndarray, budget: Budget, nnz: int, n: int,
            m: int) -> np.ndarray:
    """Greedy choice of candidate blocks by decreasing mass within the budget."""
    flat_mass, flat_area = mass.ravel(), area.ravel()
    keep = np.zeros(flat_mass.size, dtype=bool)
    # Blocks holding mass, by decreasing mass (lower index first on ties): sorting only
    # these keeps the work and memory at the nonzero blocks, not the whole grid.
    order = np.flatnonzero(flat_mass > 0)
    order = order[np.lexsort((order, -flat_mass[order]))]
    area_limit, count_limit = _budget_limits(budget, nnz, n, m)
    if budget.kind == "retained":
        target = budget.value * mass.sum()
        cum = np.cumsum(flat_mass[order])
        # Small tolerance so a target of exactly 1.0 is reachable despite rounding.
        j = int(np.searchsorted(cum, target * (1 - 1e-12), side="left")) + 1
        keep[order[:j]] = True
    elif count_limit is not None:
        keep[order[:count_limit]] = True
    else:
        cum = np.cumsum(flat_area[order])
        j = int(np.searchsorted(cum, area_limit, side="right"))
        keep[order[:j]] = True
        left = area_limit - (cum[j - 1] if j else 0)
        # Only short edge blocks can still fit after the first one that did not (and
        # only those fitting what is left now: it only shrinks).
        rest = order[j:]
        for idx in rest[flat_area[rest] <= left]:
            if flat_area[idx] <= left:
                keep[idx] = True
                left -= flat_area[idx]
    return keep.reshape(mass.shape)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Every block a layout may keep once the permutations are fixed.

    ``mass`` and ``area`` have shape (n_panels, n_groups) for "grid" and
    (n_panels, n_tiles) for "shuffled", where tile ``t`` of panel ``p`` is that panel's
    ``t``-th best group of ``bc`` columns, ``order[p]`` being its columns by decreasing mass.
    """

    format: str
    block_shape: tuple[int, int]
    shape: tuple[int, int]
    row_perm: np.ndarray
    col_perm: np.ndarray | None
    mass: np.ndarray
    area: np.ndarray
    order: np.ndarray | None = None


def positions(perm) -> np.ndarray:
    """The inverse permutation: ``positions(perm)[perm[i]] == i``, i.e. where each
    original item sits in the regrouped order."""
    perm = np.asarray(perm, np.intp)
    pos = np.empty(perm.size, np.intp)
    pos[perm] = np.arange(perm.size)
    return pos


def group_indicator(perm, size: int) -> sp.csr_matrix:
    """(n, n_groups) 0/1 matrix: item ``i`` is in group ``p`` when its position in
    ``perm`` falls in ``p*size .. (p+1)*size - 1``. ``X.T @ group_indicator(...)`` sums
    each column of ``X`` per row panel."""
    perm = np.asarray(perm, np.intp)
    n = perm.size
    return sp.csr_matrix((np.ones(n), (np.arange(n), positions(perm) // size)),
                         shape=(n, -(-n // size)))


def table_cells(shape: tuple[int, int], block: tuple[int, int], fmt: str) -> int:
    """Cells of a layout's candidate tables: panels x column groups ("grid"), panels x
    columns ("shuffled": each panel ranks every column)."""
    n, m = shape
    P = -(-n // block[0])
    return P * (-(-m // block[1]) if fmt == "grid" else m)


def candidates(M: sp.csr_matrix, row_perm, col_perm, block: tuple[int, int],
               fmt: str) -> Candidates:
    """The candidate blocks of ``M`` (values = objective mass) under fixed permutations."""
    check_choice(fmt, "format", "candidates", set(FORMATS))
    # A COO input is used as is (refinement rebuilds candidates many times from one).
    coo = M if isinstance(M, sp.coo_matrix) else sp.csr_matrix(M).tocoo()
    n, m = coo.shape
    br, bc = block
    row_perm = np.asarray(row_perm, np.intp)
    P, Q = -(-n // br), -(-m // bc)
    panel = positions(row_perm)[coo.row] // br
    area = np.outer(_sizes(n, br), _sizes(m, bc))
    if fmt == "grid":
        col_perm = np.asarray(col_perm, np.intp)
        flat = panel * Q + positions(col_perm)[coo.col] // bc
        mass = np.bincount(flat, weights=coo.data, minlength=P * Q).reshape(P, Q)
        return Candidates("grid", (br, bc), (n, m), row_perm, col_perm, mass, area)
    colmass = np.bincount(panel * m + coo.col, weights=coo.data,
                          minlength=P * m).reshape(P, m)
    # Per panel, columns by decreasing mass (stable: lower index first on ties).
    order = np.argsort(-colmass, axis=1, kind="stable")
    padded = np.zeros((P, Q * bc))
    padded[:, :m] = np.take_along_axis(colmass, order, axis=1)
    mass = padded.reshape(P, Q, bc).sum(axis=2)
    return Candidates("shuffled", (br, bc), (n, m), row_perm, None, mass, area, order)


def assemble(c: Candidates, kept: np.ndarray) -> Layout:
    """The layout that keeps the candidate blocks marked in ``kept``."""
    kept = np.asarray(kept, dtype=bool)
    area = int(c.area[kept].sum())
    mass = float(c.mass[kept].sum())
    if c.format == "grid":
        return Layout("grid", c.block_shape, c.shape, c.row_perm, c.col_perm, None, kept,
                      area, mass)
    m, bc = c.shape[1], c.block_shape[1]
    bounds = np.minimum(np.arange(kept.shape[1] + 1) * bc, m)
    panel_cols = tuple(
        np.concatenate([c.order[p, bounds[t]:bounds[t + 1]] for t in np.flatnonzero(kept[p])])
        .astype(np.intp) if kept[p].any() else np.zeros(0, np.intp)
        for p in range(kept.shape[0]))
    return Layout("shuffled", c.block_shape, c.shape, c.row_perm, None, panel_cols, kept,
                  area, mass)


def select(c: Candidates, budget: Budget, nnz: int) -> np.ndarray:
    """The kept-block choice of :func:`build_layout` for these candidates."""
    return select_blocks(c.mass, c.area, budget, nnz, *c.shape)


def build_layout(M: sp.spmatrix, row_perm, col_perm, block: tuple[int, int], fmt: str,
                 budget: Budget, nnz: int | None = None) -> Layout:
    """Choose the kept blocks of ``M`` (values = objective mass) under ``budget``.

    ``col_perm`` is required for "grid" and ignored for "shuffled" (each panel picks its
    own columns). ``nnz`` is the input's nonzero count (defaults to ``M.nnz``), the area
    budget of "iso". Blocks are taken by decreasing mass while the budget allows, which is
    optimal for fixed permutations when the blocks have equal area.
    """
    c = candidates(M, row_perm, col_perm, block, fmt)
    if nnz is None:
        nnz = M.nnz if sp.issparse(M) else int(np.count_nonzero(M))
    return assemble(c, select(c, budget, nnz))


def layout_mask(layout: Layout) -> np.ndarray:
    """The refilled mask in original coordinates, shape ``layout.shape``, dtype bool."""
    n, m = layout.shape
    br, bc = layout.block_shape
    mask = np.zeros((n, m), dtype=bool)
    if layout.format == "grid":
        regrouped = np.repeat(np.repeat(layout.kept, br, axis=0)[:n], bc, axis=1)[:, :m]
        mask[np.ix_(layout.row_perm, layout.col_perm)] = regrouped
        return mask
    for p, cols in enumerate(layout.panel_cols):
        if cols.size:
            mask[np.ix_(layout.row_perm[p * br:(p + 1) * br], cols)] = True
    return mask


def check_layout(mask: np.ndarray, fmt: str, block: tuple[int, int], row_perm,
                 col_perm=None, panel_cols=None, *, nm: Any = None) -> None:
    """Raise :class:`RegroupError` unless ``mask`` (2-D) is exactly a union of whole blocks
    of the given layout. This is the check a loaded result must pass.

    ``fmt="nm"`` (with ``nm``, ``block`` ``(1, M)`` and the identity ``row_perm``: N:M
    does not move rows): every row keeps at most N of each M-group of the columns
    permuted by ``col_perm`` (:func:`regroup.nm.check_nm_mask`)."""
    n, m = mask.shape
    br, bc = block
    row_perm = np.asarray(row_perm)
    if sorted(row_perm.tolist()) != list(range(n)):
        raise RegroupError("row_perm is not a permutation of the rows")
    if fmt == "nm":
        if nm is None or tuple(block) != (1, nm[1]):
            raise RegroupError(f"an N:M layout needs nm=(N, M) and block (1, M); got nm "
                               f"{nm!r}, block {tuple(block)}")
        if not np.array_equal(row_perm, np.arange(n)):
            raise RegroupError("an N:M layout does not move rows: row_perm must be the "
                               "identity")
        check_nm_mask(mask, nm, col_perm)
        return
    if fmt == "grid":
        col_perm = np.asarray(col_perm)
        if sorted(col_perm.tolist()) != list(range(m)):
            raise RegroupError("col_perm is not a permutation of the columns")
        R = mask[np.ix_(row_perm, col_perm)]
        P, Q = -(-n // br), -(-m // bc)
        pad = np.zeros((P * br, Q * bc), dtype=np.int64)
        pad[:n, :m] = R
        counts = pad.reshape(P, br, Q, bc).sum(axis=(1, 3))
        area = np.outer(_sizes(n, br), _sizes(m, bc))
        if not np.all((counts == 0) | (counts == area)):
            raise RegroupError("mask is not a union of whole grid blocks")
        return
    P = -(-n // br)
    if panel_cols is None or len(panel_cols) != P:
        raise RegroupError(f"shuffled layout needs {P} panel column lists")
    expect = np.zeros_like(mask)
    for p, cols in enumerate(panel_cols):
        cols = np.asarray(cols, np.intp)
        if np.unique(cols).size != cols.size:
            raise RegroupError(f"panel {p} lists a column twice")
        rest = cols.size % bc
        if rest and rest != m % bc:
            raise RegroupError(f"panel {p} keeps {cols.size} columns, not whole tiles of {bc}")
        expect[np.ix_(row_perm[p * br:(p + 1) * br], cols)] = True
    if not np.array_equal(expect, mask):
        raise RegroupError("mask differs from the union of the panels' column tiles")

