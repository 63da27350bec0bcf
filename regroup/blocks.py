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
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .validation import RegroupError, check_choice, check_distinct_list, is_permutation
from .nm import check_nm_mask

__all__ = ["FORMATS", "MAX_TABLE_CELLS", "Budget", "Candidates", "Layout", "assemble",
           "build_layout", "candidates", "check_layout", "group_indicator", "group_sums",
           "layout_mask", "mostly_stored", "panel_table", "row_group_sums", "summing_form",
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


def group_sums(A: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
    """Sums of the dense array ``A`` over consecutive groups of ``size`` entries along
    ``axis`` (the last group short when ``size`` does not divide it): for floats,
    ``np.add.reduceat`` at ``0, size, 2*size, ...`` (up to rounding), several times
    faster as a reshaped sum. Bools and small ints are summed as ``ndarray.sum`` sums
    them (bools are counted), not kept in their type as ``reduceat`` keeps them."""
    n = A.shape[axis]
    full = n - n % size
    A = np.moveaxis(A, axis, 0)
    out = A[:full].reshape(full // size, size, *A.shape[1:]).sum(axis=1)
    if full < n:
        out = np.concatenate([out, A[full:].sum(axis=0, keepdims=True)])
    return np.moveaxis(out, 0, axis)


#: Bytes of the slab buffer :func:`row_group_sums` gathers rows into.
SLAB_BYTES = 1 << 18


def row_group_sums(A: np.ndarray, rows: np.ndarray, size: int, *,
                   square: bool = False) -> np.ndarray:
    """``group_sums(A[rows], size)`` for a 2-D ``A`` (with ``square``, of
    ``np.square(A[rows], dtype=np.float64)``), the same sums to the bit, gathered a slab
    of whole groups at a time through small buffers. A full-size copy of a large matrix
    costs more in fresh pages (a page fault per 4 KiB, on every call) than the sums."""
    n, m = rows.size, A.shape[1]
    k = -(-n // size)
    width = max(m, 1) * size * (8 if square else A.dtype.itemsize)
    per = max(1, SLAB_BYTES // width)                      # groups per slab
    # (indices outside [0, len(A)) take the plain path: numpy's own error or wrap-around)
    if per >= k or rows.min() < 0 or rows.max() >= A.shape[0]:
        return group_sums(np.square(A[rows], dtype=np.float64) if square else A[rows], size)
    taken = np.empty((per * size, m), A.dtype)
    squared = (taken if A.dtype == np.float64 else np.empty((per * size, m))) if square \
        else None
    out = None
    for start in range(0, k, per):
        sel = rows[start * size:(start + per) * size]
        slab = np.take(A, sel, axis=0, out=taken[:sel.size], mode="clip")
        if square:
            slab = np.square(slab, out=squared[:sel.size], dtype=np.float64)
        part = group_sums(slab, size)
        if out is None:
            out = np.empty((k, m), part.dtype)
        out[start:start + part.shape[0]] = part
    return out


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


# A matrix is summed densely when at least this share of its entries is stored and it
# has at most this many cells (a 64 MiB float64 copy).
DENSE_SHARE = 0.25
DENSE_CELLS = 1 << 23


def mostly_stored(M: sp.spmatrix) -> bool:
    """Whether the sparse ``M`` is summed as a dense copy: at least ``DENSE_SHARE`` of
    its entries stored, at most ``DENSE_CELLS`` cells."""
    n, m = M.shape
    return n * m <= DENSE_CELLS and M.nnz >= DENSE_SHARE * n * m


def summing_form(M: sp.spmatrix) -> sp.coo_matrix | np.ndarray:
    """``M`` in the form :func:`candidates` sums it in: a dense float64 copy when
    :func:`mostly_stored` (its slices sum several times faster than the entries), else
    COO. Build it once for many layouts of one matrix."""
    if mostly_stored(M):
        return _float_array(M)
    return M if isinstance(M, sp.coo_matrix) else sp.csr_matrix(M).tocoo()


def _float_array(M: sp.spmatrix | np.ndarray) -> np.ndarray:
    """``M`` as a dense float64 array (no copy when it is one)."""
    arr = M if isinstance(M, np.ndarray) else M.toarray()
    return arr.astype(np.float64, copy=False)


def candidates(M: sp.spmatrix | np.ndarray, row_perm, col_perm, block: tuple[int, int],
               fmt: str) -> Candidates:
    """The candidate blocks of ``M`` (values = objective mass) under fixed permutations.

    ``M`` is a scipy sparse matrix (a COO one is used as is: refinement rebuilds the
    candidates many times from one) or a dense 2-D ndarray. A matrix that is
    :func:`mostly_stored` is summed as a dense float64 array whichever form it comes in
    (:func:`summing_form` converts it once for many calls): the sums, and so the blocks
    chosen among exact ties, do not depend on the form."""
    check_choice(fmt, "format", "candidates", set(FORMATS))
    dense = isinstance(M, np.ndarray) or mostly_stored(M)
    if dense:
        M = _float_array(M)
    coo = None if dense else M if isinstance(M, sp.coo_matrix) else sp.csr_matrix(M).tocoo()
    n, m = M.shape
    br, bc = block
    row_perm = np.asarray(row_perm, np.intp)
    P, Q = -(-n // br), -(-m // bc)
    area = np.outer(_sizes(n, br), _sizes(m, bc))
    if dense:
        # (panels, columns): each column's mass over each panel's rows. The identity
        # order sums a C-ordered M in place (no copy; the rows gathered in slabs are
        # C-ordered too, so the sums are the same to the bit).
        in_place = M.flags.c_contiguous and np.array_equal(row_perm, np.arange(n))
        colmass = group_sums(M, br, 0) if in_place else row_group_sums(M, row_perm, br)
    else:
        panel = positions(row_perm)[coo.row] // br
    if fmt == "grid":
        col_perm = np.asarray(col_perm, np.intp)
        if dense:
            mass = group_sums(colmass[:, col_perm], bc, 1)
        else:
            flat = panel * Q + positions(col_perm)[coo.col] // bc
            mass = np.bincount(flat, weights=coo.data, minlength=P * Q).reshape(P, Q)
        return Candidates("grid", (br, bc), (n, m), row_perm, col_perm, mass, area)
    if not dense:
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
    # Position k of panel p's column order is kept when its tile k // bc is: the kept
    # columns of each panel, tile after tile, in one pass.
    in_order = np.repeat(kept, bc, axis=1)[:, :m]
    cols = c.order[in_order].astype(np.intp)
    ends = np.cumsum(np.count_nonzero(in_order, axis=1)).tolist()
    panel_cols = tuple(cols[a:b] for a, b in zip([0] + ends[:-1], ends))
    return Layout("shuffled", c.block_shape, c.shape, c.row_perm, None, panel_cols, kept,
                  area, mass)


def select(c: Candidates, budget: Budget, nnz: int) -> np.ndarray:
    """The kept-block choice of :func:`build_layout` for these candidates."""
    return select_blocks(c.mass, c.area, budget, nnz, *c.shape)


def build_layout(M: sp.spmatrix | np.ndarray, row_perm, col_perm, block: tuple[int, int],
                 fmt: str, budget: Budget, nnz: int | None = None) -> Layout:
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


def _panel_table(panel_cols: Sequence[np.ndarray], m: int) -> np.ndarray:
    """(n_panels, m) bool: panel p keeps column c (columns taken as valid; see
    :func:`panel_table` for lists not yet checked)."""
    lengths = np.fromiter((len(c) for c in panel_cols), np.intp, len(panel_cols))
    table = np.zeros((len(panel_cols), m), bool)
    if lengths.sum():
        cols = np.concatenate([np.asarray(c, np.intp) for c in panel_cols])
        table[np.repeat(np.arange(lengths.size), lengths), cols] = True
    return table


def panel_table(panel_cols: Sequence[Any], m: int, bc: int) -> np.ndarray:
    """The (n_panels, m) bool table of shuffled panel column lists (panel ``p`` keeps
    column ``c``), after checking them in one pass: per panel a 1-D list of distinct
    integer columns in ``[0, m)`` making whole tiles of ``bc`` (or a short tile of
    ``m % bc`` last).

    Raises
    ------
    ValueError
        ``"panel p ..."``: the first panel that is not such a list, and why.
    """
    arrs = [np.asarray(c) for c in panel_cols]
    for p, c in enumerate(arrs):
        if c.ndim != 1 or (c.size and c.dtype.kind not in "iu"):
            raise ValueError(f"panel {p} lists something other than columns in "
                             f"[0, {m}) ({c.size} entries of dtype {c.dtype}, "
                             f"{c.ndim}-D)")
    lengths = np.fromiter((c.size for c in arrs), np.intp, len(arrs))
    short = m % bc
    rest = lengths % bc
    odd = np.flatnonzero((rest != 0) & (rest != short))
    if odd.size:
        p = int(odd[0])
        raise ValueError(f"panel {p} keeps {int(lengths[p])} columns, not whole tiles "
                         f"of {bc}" + (f" (a short tile of {short} last)" if short else ""))
    table = np.zeros((len(arrs), m), bool)
    if not lengths.sum():
        return table
    cols = np.concatenate([c.astype(np.intp, copy=False) for c in arrs])
    panel = np.repeat(np.arange(len(arrs)), lengths)
    outside = np.flatnonzero((cols < 0) | (cols >= m))
    if outside.size:
        raise ValueError(f"panel {int(panel[outside[0]])} lists something other than "
                         f"columns in [0, {m}) (column {int(cols[outside[0]])})")
    table[panel, cols] = True
    twice = np.flatnonzero(np.count_nonzero(table, axis=1) != lengths)
    if twice.size:
        raise ValueError(f"panel {int(twice[0])} lists a column twice")
    return table


def _spread(table: np.ndarray, row_perm: np.ndarray, br: int) -> np.ndarray:
    """The (n, m) mask whose row ``row_perm[i]`` is row ``i // br`` of the panel table."""
    n = row_perm.size
    mask = np.empty((n, table.shape[1]), bool)
    mask[row_perm] = table[np.arange(n) // br]
    return mask


def layout_mask(layout: Layout) -> np.ndarray:
    """The refilled mask in original coordinates, shape ``layout.shape``, dtype bool."""
    n, m = layout.shape
    br, bc = layout.block_shape
    if layout.format == "grid":
        # Each original row's and column's block, then one full-size gather.
        row_block = positions(layout.row_perm) // br
        col_block = positions(layout.col_perm) // bc
        return np.asarray(layout.kept, bool)[row_block][:, col_block]
    return _spread(_panel_table(layout.panel_cols, m), layout.row_perm, br)


def check_layout(mask: np.ndarray, fmt: str, block: tuple[int, int], row_perm,
                 col_perm=None, panel_cols=None, *, nm: Any = None) -> None:
    """Raise :class:`RegroupError` unless ``mask`` (2-D) is exactly a union of whole blocks
    of the given layout. This is the check a loaded result must pass.

    ``fmt="nm"`` (with ``nm``, ``block`` ``(1, M)`` and the identity ``row_perm``: N:M
    does not move rows): every row keeps at most N of each M-group of the columns
    permuted by ``col_perm`` (:func:`regroup.nm.check_nm_mask`). ``mask`` holds bools,
    or the numbers 0 and 1; any other value is refused."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        as_bool = mask.astype(bool)
        if not np.array_equal(as_bool, mask):
            raise RegroupError("mask holds values other than 0 and 1")
        mask = as_bool
    n, m = mask.shape
    br, bc = block
    row_perm = np.asarray(row_perm)
    if not is_permutation(row_perm, n):
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
        if not is_permutation(col_perm, m):
            raise RegroupError("col_perm is not a permutation of the columns")
        R = mask.take(row_perm, axis=0).take(col_perm, axis=1)
        counts = group_sums(group_sums(R, br, 0), bc, 1)
        area = np.outer(_sizes(n, br), _sizes(m, bc))
        if not np.all((counts == 0) | (counts == area)):
            raise RegroupError("mask is not a union of whole grid blocks")
        return
    P = -(-n // br)
    if panel_cols is None or len(panel_cols) != P:
        raise RegroupError(f"shuffled layout needs {P} panel column lists")
    try:
        table = panel_table(panel_cols, m, bc)
    except ValueError as exc:
        raise RegroupError(str(exc)) from None
    if not np.array_equal(_spread(table, row_perm.astype(np.intp), br), mask):
        raise RegroupError("mask differs from the union of the panels' column tiles")
