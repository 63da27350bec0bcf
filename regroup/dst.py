"""Dynamic sparse training on block layouts, torch-free: layer densities, the drop
schedule, units and their scores, drop/grow selection, churn, warm re-layouts and one
whole mask update of a layer (:func:`update_layout`).

RigL-style training (Evci et al., ICML 2020) prunes and regrows weights every ``T`` steps;
DSB (NeurIPS 2022) does it with whole blocks. Here the thing dropped or grown is a *unit*
of a block layout:

``grid``
    A block of the permuted grid: rows ``row_perm[p*br:(p+1)*br]`` x columns
    ``col_perm[j*bc:(j+1)*bc]``.
``shuffled``
    A tile of a panel: rows ``row_perm[p*br:(p+1)*br]`` x columns
    ``col_orders[p, j*bc:(j+1)*bc]``, where ``col_orders[p]`` is panel ``p``'s own order
    of all the columns (its kept tiles first, then the rest grouped into tiles).

Either way the units of a :class:`Units` are the ``(n_panels, n_tiles)`` cells of one
table, disjoint, non-empty and covering the matrix, so a set of kept units (a bool array
of that shape, or the flat indices ``p * n_tiles + j`` of its True cells) and the refilled
mask determine each other (:func:`units_mask`, :func:`units_kept`). When a dimension is
not a multiple of the block, the last panel / tile (``j = n_tiles - 1``) is short, as in
:mod:`regroup.blocks`. ``row_perm[i]`` is the original row at position ``i``.

The PyTorch sparsifier that drives these lives in the adapters; nothing here imports torch.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .validation import (RegroupError, check_block, check_choice, check_int, check_real,
                         is_permutation)
from .blocks import (FORMATS, Budget, Layout, check_layout, group_sums, layout_mask,
                     panel_table, row_group_sums)
from .refine import warm_start

__all__ = ["DISTRIBUTIONS", "RTOL", "DropGrow", "LayoutUpdate", "Units", "churn",
           "drop_count", "drop_fraction", "drop_grow", "erk_densities", "layer_densities",
           "layout_units", "make_units", "relayout", "uniform_densities", "unit_scores",
           "units_for_density", "units_kept", "units_layout", "units_mask", "update_layout"]

#: Slack on float comparisons of masses (sums of float64 over up to ~1e7 positions):
#: a re-layout must gain more than this share, and its churn may exceed d_t by it.
RTOL = 1e-9


# -- layer densities ---------------------------------------------------------------------------
def _check_shapes(shapes: Any, caller: str) -> list[tuple[int, ...]]:
    allowed = "a non-empty sequence of shapes (tuples of positive ints)"
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
        raise (TypeError if not isinstance(shapes, Sequence) else ValueError)(
            f"The 'shapes' parameter of {caller} must be {allowed}. Got {shapes!r} instead.")
    out = []
    for i, s in enumerate(shapes):
        if isinstance(s, numbers.Integral) and not isinstance(s, bool):
            s = (s,)
        if (not isinstance(s, Sequence) or not s or isinstance(s, str)
                or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
                       for d in s)):
            raise ValueError(f"The 'shapes' parameter of {caller} must be {allowed}. Got "
                             f"{s!r} at index {i} instead.")
        out.append(tuple(int(d) for d in s))
    return out


def _check_dense(dense: Any, n_layers: int, caller: str) -> np.ndarray:
    try:
        idx = np.asarray(list(dense) if not isinstance(dense, np.ndarray) else dense)
    except TypeError:
        raise TypeError(f"The 'dense' parameter of {caller} must be a sequence of layer "
                        f"indices. Got {type(dense).__name__} instead.") from None
    if idx.size and (idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer)
                     or idx.min() < 0 or idx.max() >= n_layers
                     or np.unique(idx).size != idx.size):
        raise ValueError(f"The 'dense' parameter of {caller} must list distinct layer "
                         f"indices in [0, {n_layers}). Got {dense!r} instead.")
    out = np.zeros(n_layers, bool)
    out[idx.astype(np.intp)] = True
    return out


def _scaled(raw: np.ndarray, sizes: np.ndarray, sparsity: float, dense: np.ndarray,
            caller: str) -> np.ndarray:
    """Densities ``eps * raw`` (``eps`` shared) that keep ``(1 - sparsity)`` of all the
    weights, with the ``dense`` layers at 1. While the largest ``eps * raw`` exceeds 1,
    those layers are made dense and ``eps`` is solved again (RigL's
    ``get_sparsities_erdos_renyi``): each pass fixes at least one layer, so it ends."""
    dense = dense.copy()
    target = (1.0 - sparsity) * float(sizes.sum())
    while True:
        left = target - float(sizes[dense].sum())
        if left < -1e-9 * target:
            raise ValueError(f"{caller}: the layers kept dense hold "
                             f"{int(sizes[dense].sum())} weights, more than the "
                             f"{target:.0f} that sparsity {sparsity!r} keeps")
        rest = ~dense
        if not rest.any():
            break
        eps = max(left, 0.0) / float((raw[rest] * sizes[rest]).sum())
        over = rest & (eps * raw > 1.0)
        if not over.any():
            break
        # The largest raw density goes dense per pass, as in RigL. (Capping every layer
        # above 1 at once gives the same set: capping one only raises eps.)
        dense |= rest & (raw == raw[rest].max())
    out = np.ones(raw.size)
    out[~dense] = eps * raw[~dense] if (~dense).any() else 1.0
    return out


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float, *,
                  dense: Sequence[int] = ()) -> np.ndarray:
    """Per-layer densities of RigL's Erdos-Renyi-Kernel rule.

    Layer ``l`` of shape ``(d_1, ..., d_k)`` (a Linear's ``(out, in)``, a conv's ``(out,
    in, kh, kw)``) gets density ``eps * sum(shape) / prod(shape)``, ``eps`` chosen so that
    ``(1 - sparsity)`` of all the weights are kept. A layer whose density would exceed 1
    is made dense and the others are scaled again, one layer at a time (RigL's code).

    Parameters
    ----------
    shapes : sequence of shapes
        The weight shape of each layer.
    sparsity : float in [0, 1)
        The share of all the weights to prune.
    dense : sequence of int, default=()
        Indices of layers kept fully dense. Their weights count in the total, so the
        other layers are pruned harder, as for the layers the cap makes dense. (To leave
        a layer out of the budget, leave it out of ``shapes``.)

    Returns
    -------
    ndarray of float64, shape (n_layers,)
        Densities in [0, 1]; ``sum(density * size) == (1 - sparsity) * sum(size)``.

    Raises
    ------
    ValueError, TypeError
        Invalid shapes, sparsity or indices; dense layers holding more than the budget.

    References
    ----------
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020
    (google-research/rigl, ``sparse_utils.get_sparsities_erdos_renyi``).
    """
    return layer_densities(shapes, sparsity, distribution="erk", dense=dense,
                           caller="erk_densities")


def uniform_densities(shapes: Sequence[Sequence[int]], sparsity: float, *,
                      dense: Sequence[int] = ()) -> np.ndarray:
    """Every layer at the same density, ``1 - sparsity`` when no layer is kept dense
    (otherwise the others share what the ``dense`` ones leave, as in
    :func:`erk_densities`)."""
    return layer_densities(shapes, sparsity, distribution="uniform", dense=dense,
                           caller="uniform_densities")


def _erk_raw(shapes: list[tuple[int, ...]]) -> np.ndarray:
    return np.array([sum(s) / math.prod(s) for s in shapes], dtype=float)


def _uniform_raw(shapes: list[tuple[int, ...]]) -> np.ndarray:
    return np.ones(len(shapes))


#: The layer-density rules: name -> raw (unscaled) densities of a list of shapes.
DISTRIBUTIONS: dict[str, Callable[[list[tuple[int, ...]]], np.ndarray]] = {
    "erk": _erk_raw, "uniform": _uniform_raw}


def layer_densities(shapes: Sequence[Sequence[int]], sparsity: float, *,
                    distribution: str = "erk", dense: Sequence[int] = (),
                    caller: str = "layer_densities") -> np.ndarray:
    """Per-layer densities under ``distribution`` (a key of :data:`DISTRIBUTIONS`:
    ``"erk"``, :func:`erk_densities`, or ``"uniform"``, :func:`uniform_densities`).
    ``caller`` names the entry point in error messages."""
    check_choice(distribution, "distribution", caller, set(DISTRIBUTIONS))
    shapes = _check_shapes(shapes, caller)
    sparsity = check_real(sparsity, "sparsity", caller, 0, 1, high_open=True)
    fixed = _check_dense(dense, len(shapes), caller)
    sizes = np.array([math.prod(s) for s in shapes], dtype=float)
    return _scaled(DISTRIBUTIONS[distribution](shapes), sizes, sparsity, fixed, caller)


# -- schedule ----------------------------------------------------------------------------------
def drop_fraction(t: float, t_end: float, alpha: float = 0.3) -> float:
    """RigL's cosine drop fraction: ``alpha / 2 * (1 + cos(pi * t / t_end))`` for
    ``0 <= t <= t_end``, 0 after ``t_end`` (the mask is then frozen).

    ``t`` and ``t_end`` are in the same unit (steps); ``alpha`` in [0, 1] is the fraction
    at ``t = 0`` (0.3 in RigL and DSB)."""
    caller = "drop_fraction"
    for name, v in (("t", t), ("t_end", t_end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or v < 0 or (name == "t_end" and v == 0):
            bound = "> 0" if name == "t_end" else ">= 0"
            raise ValueError(f"The {name!r} parameter of {caller} must be a finite number "
                             f"{bound}. Got {v!r} instead.")
    alpha = check_real(alpha, "alpha", caller, 0, 1)
    if t > t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * t / t_end))


def drop_count(n_kept: int, fraction: float) -> int:
    """How many of ``n_kept`` units a drop of ``fraction`` removes: ``floor(fraction *
    n_kept)`` (rounding down, so the count never exceeds the fraction; RigL's PyTorch
    ports do the same), up to float rounding of the product."""
    n_kept = check_int(n_kept, "n_kept", "drop_count", low=0)
    fraction = check_real(fraction, "fraction", "drop_count", 0, 1)
    # 0.3 * 10 is 3.0000000000000004 and 0.29 * 100 is 28.999999999999996: forgive ulps.
    return min(int(math.floor(fraction * n_kept * (1 + 1e-12))), n_kept)


# -- units -------------------------------------------------------------------------------------
def _sizes(n: int, b: int) -> np.ndarray:
    k = -(-n // b)
    s = np.full(k, b, dtype=np.int64)
    s[-1] = n - b * (k - 1)
    return s


@dataclass(frozen=True, eq=False)
class Units:
    """The units of a block layout (see the module docstring).

    Attributes
    ----------
    format : {"grid", "shuffled"}
    block_shape : (int, int)
    shape : (int, int)
        The matrix (rows are output features; a conv is ``(out, in*kh*kw)``).
    row_perm : ndarray of intp, shape (n_rows,)
        ``row_perm[i]`` is the original row at position ``i``; panel ``p`` holds
        positions ``p*br .. (p+1)*br - 1``.
    col_orders : ndarray of intp, shape (n_panels, n_cols)
        Panel ``p``'s column order: tile ``j`` of the panel holds the original columns
        ``col_orders[p, j*bc:(j+1)*bc]``. For "grid" every row is ``col_perm`` (a
        read-only broadcast view).
    """

    format: str
    block_shape: tuple[int, int]
    shape: tuple[int, int]
    row_perm: np.ndarray
    col_orders: np.ndarray

    @property
    def table_shape(self) -> tuple[int, int]:
        """``(n_panels, n_tiles)``: the shape of kept arrays and scores."""
        return (-(-self.shape[0] // self.block_shape[0]),
                -(-self.shape[1] // self.block_shape[1]))

    @property
    def n_units(self) -> int:
        return math.prod(self.table_shape)

    @property
    def col_perm(self) -> np.ndarray | None:
        """The grid's column order (``col_perm[j]`` is the original column at position
        ``j``); None for "shuffled"."""
        return self.col_orders[0] if self.format == "grid" else None

    def area(self) -> np.ndarray:
        """(n_panels, n_tiles) int64: the positions each unit covers."""
        return np.outer(_sizes(self.shape[0], self.block_shape[0]),
                        _sizes(self.shape[1], self.block_shape[1]))


def _check_perm(perm: Any, n: int, name: str, caller: str) -> np.ndarray:
    arr = np.asarray(perm)
    if not is_permutation(arr, n):
        raise ValueError(f"The {name!r} parameter of {caller} must be a permutation of "
                         f"range({n}). Got an array of shape {arr.shape} and dtype "
                         f"{arr.dtype} that is not one instead.")
    return arr.astype(np.intp, copy=False)


def _matrix_view(values: Any, shape: tuple[int, int], name: str, caller: str,
                 whose: str = "the units'") -> np.ndarray:
    """``values`` as a real (n, m) array in its own dtype (N-D flattened to (d0, -1));
    ``whose`` names the shape expected in the error."""
    arr = np.asarray(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"The {name!r} parameter of {caller} must be a real numeric array. "
                        f"Got dtype {arr.dtype} instead.")
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim >= 2 else arr
    if flat.shape != tuple(shape):
        raise ValueError(f"The {name!r} parameter of {caller} must have {whose} shape "
                         f"{tuple(shape)} (N-D flattened to (d0, -1)). Got shape "
                         f"{arr.shape} instead.")
    return flat


def _check_finite(flat: np.ndarray, name: str, caller: str, shape: tuple[int, ...]) -> None:
    bad = flat.size - int(np.count_nonzero(np.isfinite(flat)))
    if bad:
        raise ValueError(f"The {name!r} parameter of {caller} must be finite. Got {bad} "
                         f"NaN or inf values (shape {shape}) instead.")


def _check_2d(values: Any, shape: tuple[int, int], name: str, caller: str,
              whose: str = "the units'") -> np.ndarray:
    """``values`` as a float64 (n, m) array (N-D flattened to (d0, -1)), finite;
    ``whose`` names the shape expected in the error."""
    flat = _matrix_view(values, shape, name, caller, whose).astype(np.float64, copy=False)
    _check_finite(flat, name, caller, np.shape(values))
    return flat


def _panel_column_sums(A: np.ndarray, row_perm: np.ndarray, br: int) -> np.ndarray:
    """(n_panels, n_cols): each column's sum of ``A`` over each panel's rows."""
    return row_group_sums(A, row_perm, br)


def make_units(shape: tuple[int, int], block: Any, format: str, *, row_perm: Any = None,
               col_perm: Any = None, panel_cols: Sequence[Any] | None = None,
               rank: Any = None) -> Units:
    """The units of a layout given by its orders.

    Parameters
    ----------
    shape : (int, int)
        The matrix shape.
    block : int, (int, int) or str
        The block ``br x bc`` (as :class:`regroup.RegroupOptions` reads it).
    format : {"grid", "shuffled"}
    row_perm : array of int, optional
        Default: the identity.
    col_perm : array of int, optional
        "grid" only; default: the identity.
    panel_cols : sequence of arrays of int, optional
        "shuffled" only: per panel, its kept columns tile after tile (a short tile of
        ``n_cols % bc`` columns last), as in :class:`regroup.blocks.Layout`. They become
        the panel's first tiles (the short one its last tile). Default: no kept column.
    rank : array-like of shape (n_rows, n_cols), optional
        "shuffled": the columns a panel does not keep are grouped into tiles by
        decreasing sum of ``rank**2`` over the panel's rows (lower index first on ties);
        default: by increasing index. Pass the dense gradient so that a grown tile
        gathers the columns with the most gradient. No effect on "grid", whose tiles
        ``col_perm`` fixes.

    Returns
    -------
    Units

    Raises
    ------
    ValueError, TypeError
        Invalid shape, block, orders, panel columns or rank.
    """
    caller = "make_units"
    check_choice(format, "format", caller, set(FORMATS))
    if (not isinstance(shape, Sequence) or len(shape) != 2
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
                   for d in shape)):
        raise ValueError(f"The 'shape' parameter of {caller} must be a pair of positive "
                         f"ints. Got {shape!r} instead.")
    n, m = int(shape[0]), int(shape[1])
    br, bc = check_block(block, caller)
    if br > n or bc > m:
        raise ValueError(f"The 'block' parameter of {caller} must fit the shape {(n, m)}. "
                         f"Got {br}x{bc} instead.")
    rows = np.arange(n, dtype=np.intp) if row_perm is None else \
        _check_perm(row_perm, n, "row_perm", caller)
    P = -(-n // br)
    if format == "grid":
        if panel_cols is not None:
            raise ValueError(f"The 'panel_cols' parameter of {caller} applies to the "
                             "shuffled format only (grid columns follow col_perm). Got "
                             "a value with format='grid' instead.")
        if rank is not None:      # checked, so that one call serves both formats
            _check_2d(rank, (n, m), "rank", caller)
        cols = np.arange(m, dtype=np.intp) if col_perm is None else \
            _check_perm(col_perm, m, "col_perm", caller)
        return Units("grid", (br, bc), (n, m), rows, np.broadcast_to(cols, (P, m)))
    if col_perm is not None:
        raise ValueError(f"The 'col_perm' parameter of {caller} applies to the grid format "
                         "only (shuffled panels order their own columns). Got a value with "
                         "format='shuffled' instead.")
    cols_of = None
    if panel_cols is not None:
        if isinstance(panel_cols, (str, bytes)) or not isinstance(panel_cols, Sequence) \
                or len(panel_cols) != P:
            raise ValueError(f"The 'panel_cols' parameter of {caller} must be a sequence of "
                             f"{P} arrays of column indices (one per panel). Got "
                             f"{type(panel_cols).__name__} of length "
                             f"{len(panel_cols) if hasattr(panel_cols, '__len__') else '?'} "
                             "instead.")
        try:
            panel_table(panel_cols, m, bc)
        except ValueError as exc:
            raise ValueError(f"The 'panel_cols' parameter of {caller} must list, per panel, "
                             f"distinct columns in [0, {m}) making whole tiles of {bc} (a "
                             f"short tile of {m % bc} last). Got one where {exc} "
                             "instead.") from None
        cols_of = panel_cols
    score = None if rank is None else _panel_column_sums(
        np.square(_check_2d(rank, (n, m), "rank", caller)), rows, br)
    return _shuffled_units((n, m), (br, bc), rows, cols_of, score)


def _shuffled_units(shape: tuple[int, int], block: tuple[int, int], rows: np.ndarray,
                    panel_cols: Sequence[Any] | None, score: np.ndarray | None) -> Units:
    """:func:`make_units` "shuffled" on checked arguments; ``score`` (n_panels, n_cols)
    ranks the free columns of each panel (higher first), None: by index."""
    (n, m), (br, bc) = shape, block
    P = -(-n // br)
    # Sort key per (panel, column): group 0 the kept full tiles (in their order), 1 the
    # free columns (by rank), 2 a kept short tile, which must stay the panel's last tile.
    group = np.ones((P, m), np.int8)
    within = np.zeros((P, m))
    lengths = np.zeros(P, np.intp) if panel_cols is None else \
        np.fromiter((len(c) for c in panel_cols), np.intp, P)
    if lengths.sum():
        cols = np.concatenate([np.asarray(c, np.intp) for c in panel_cols])
        panel = np.repeat(np.arange(P), lengths)
        at = np.arange(cols.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        full = at < np.repeat(lengths - lengths % bc, lengths)
        group[panel, cols] = np.where(full, 0, 2)
        within[panel[full], cols[full]] = at[full]
    if score is not None:
        within = np.where(group == 1, -score, within)
    index = np.broadcast_to(np.arange(m), (P, m))
    order = np.lexsort((index, within, group), axis=-1).astype(np.intp)
    return Units("shuffled", (br, bc), (n, m), rows, order)


def _as_units(units: Any, caller: str) -> Units:
    if isinstance(units, Units):
        return units
    if isinstance(units, Layout) or hasattr(units, "mask2d"):
        return layout_units(units)[0]
    raise TypeError(f"The 'units' parameter of {caller} must be a Units, a Layout or a "
                    f"LayerResult. Got {type(units).__name__} instead.")


def unit_scores(values: Any, units: Any, *, power: float = 2) -> np.ndarray:
    """Per unit, the sum of ``|values| ** power`` over its positions, for every unit
    (kept or not).

    Parameters
    ----------
    values : array-like of shape (n_rows, n_cols)
        A dense weight or gradient (a conv's 4-D weight is flattened to ``(out, -1)``).
    units : Units, Layout or LayerResult
        A layout stands for its units (:func:`layout_units`).
    power : float, default=2
        2: the squared Frobenius norm ``||W_u||_F^2`` RigL-style drop and grow rank by;
        1: the ``sum |w|`` mass of regroup's magnitude objective.

    Returns
    -------
    ndarray of float64, shape ``units.table_shape``
    """
    caller = "unit_scores"
    u = _as_units(units, caller)
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0 \
            or not math.isfinite(power):
        raise ValueError(f"The 'power' parameter of {caller} must be a finite number > 0. "
                         f"Got {power!r} instead.")
    A = np.abs(_check_2d(values, u.shape, "values", caller))    # a new array: work in it
    if power == 2:
        np.square(A, out=A)
    elif power != 1:
        np.power(A, power, out=A)
    return _unit_sums(A, u)


def _unit_sums(A: np.ndarray, u: Units) -> np.ndarray:
    """Sum of the (n, m) array ``A`` per unit: panel column sums, put in each panel's
    column order, then summed per tile. O(n*m), no loop."""
    br, bc = u.block_shape
    S = _panel_column_sums(A, u.row_perm, br)
    S = np.take_along_axis(S, u.col_orders, axis=1)
    return group_sums(S, bc, 1)


def _check_kept(kept: Any, u: Units, name: str, caller: str) -> np.ndarray:
    arr = np.asarray(kept)
    if arr.dtype != np.bool_ or arr.shape != u.table_shape:
        raise ValueError(f"The {name!r} parameter of {caller} must be a bool array of the "
                         f"units' table shape {u.table_shape}. Got shape {arr.shape} and "
                         f"dtype {arr.dtype} instead.")
    return arr


def units_mask(units: Units, kept: Any) -> np.ndarray:
    """The refilled mask (n_rows, n_cols) of the kept units (bool ``table_shape``
    array), in original coordinates; :func:`units_kept` is its inverse."""
    caller = "units_mask"
    u = _as_units(units, caller)
    kept = _check_kept(kept, u, "kept", caller)
    n, m = u.shape
    br, bc = u.block_shape
    in_order = np.repeat(kept, bc, axis=1)[:, :m]       # (P, m): position k of the order
    panel = np.zeros(in_order.shape, bool)
    np.put_along_axis(panel, u.col_orders, in_order, axis=1)
    mask = np.empty((n, m), bool)
    mask[u.row_perm] = panel[np.arange(n) // br]
    return mask


def units_kept(units: Units, mask: Any) -> np.ndarray:
    """The kept units whose union is ``mask`` (n_rows, n_cols; nonzero = kept).

    Raises
    ------
    RegroupError
        ``mask`` is not a union of whole units.
    """
    caller = "units_kept"
    u = _as_units(units, caller)
    arr = np.asarray(mask)
    kept = arr if arr.dtype == np.bool_ and arr.shape == u.shape else \
        _check_2d(arr, u.shape, "mask", caller) != 0
    return _whole(_unit_sums(kept, u), u, caller)   # group sums of bools count them


def _whole(counts: np.ndarray, u: Units, caller: str) -> np.ndarray:
    """The units whose kept-position ``counts`` fill them (RegroupError if one is only
    partly kept)."""
    area = u.area()
    partial = (counts > 0) & (counts < area)
    if partial.any():
        raise RegroupError(f"{caller}: the mask is not a union of whole units ({u.format}, "
                           f"block {u.block_shape[0]}x{u.block_shape[1]}): "
                           f"{int(partial.sum())} units are partly kept")
    return counts == area


def _check_layout_arg(layout: Any, caller: str) -> str:
    """The format of ``layout``, a grid or shuffled Layout or LayerResult (else
    TypeError)."""
    fmt = getattr(layout, "format", None)
    if not (isinstance(layout, Layout) or hasattr(layout, "mask2d")) or fmt not in FORMATS:
        raise TypeError(f"The 'layout' parameter of {caller} must be a grid or shuffled "
                        f"Layout or LayerResult. Got {type(layout).__name__} with format "
                        f"{fmt!r} instead.")
    return fmt


def layout_units(layout: Any, *, rank: Any = None) -> tuple[Units, np.ndarray]:
    """The units of a :class:`~regroup.blocks.Layout` or a
    :class:`~regroup.LayerResult` (grid or shuffled), and which of them it keeps.

    A grid layout's units are its blocks; a shuffled layout's are, per panel, its kept
    tiles (in ``panel_cols`` order) and the other columns grouped into tiles
    (:func:`make_units`, with ``rank``).

    Returns
    -------
    units : Units
    kept : ndarray of bool, shape ``units.table_shape``
    """
    caller = "layout_units"
    fmt = _check_layout_arg(layout, caller)
    if isinstance(layout, Layout):
        shape, mask = layout.shape, layout_mask(layout)
    else:
        mask = layout.mask2d
        shape = mask.shape
    u = make_units(tuple(shape), tuple(layout.block_shape), fmt, row_perm=layout.row_perm,
                   col_perm=layout.col_perm, panel_cols=layout.panel_cols, rank=rank)
    return u, units_kept(u, mask)


def units_layout(units: Units, kept: Any, unit_mass: Any) -> Layout:
    """The :class:`~regroup.blocks.Layout` keeping ``kept`` (what
    :func:`regroup.check_layout` and the engine's warm start read).

    ``unit_mass`` (``table_shape``, e.g. ``unit_scores(w, units, power=1)``) gives its
    ``kept_mass``. For "shuffled", ``Layout.kept[p, j]`` says whether tile ``j`` of the
    panel's order is kept, and ``panel_cols[p]`` lists those tiles' columns in that order
    (a kept short tile, the last, last).
    """
    caller = "units_layout"
    u = _as_units(units, caller)
    kept = _check_kept(kept, u, "kept", caller)
    mass = np.asarray(unit_mass, dtype=float)
    if mass.shape != u.table_shape:
        raise ValueError(f"The 'unit_mass' parameter of {caller} must have the units' table "
                         f"shape {u.table_shape}. Got shape {mass.shape} instead.")
    area = int(u.area()[kept].sum())
    kept_mass = float(mass[kept].sum())
    if u.format == "grid":
        return Layout("grid", u.block_shape, u.shape, u.row_perm, u.col_perm, None,
                      kept.copy(), area, kept_mass)
    in_order = np.repeat(kept, u.block_shape[1], axis=1)[:, :u.shape[1]]
    panel_cols = tuple(order[sel] for order, sel in zip(u.col_orders, in_order))
    return Layout("shuffled", u.block_shape, u.shape, u.row_perm, None, panel_cols,
                  kept.copy(), area, kept_mass)


def _layout_orders(layout: Any, caller: str) -> tuple[str, tuple[int, int], np.ndarray,
                                                      np.ndarray | None, tuple[int, int]]:
    """A grid or shuffled Layout / LayerResult argument, checked: its format, 2-D shape,
    row order, column order (grid; None for shuffled) and block; a shuffled layout's
    panel column lists are checked too. Errors name ``'layout'`` and ``caller``."""
    fmt = _check_layout_arg(layout, caller)
    if isinstance(layout, Layout):
        shape = tuple(int(x) for x in layout.shape)
    else:
        shape = np.asarray(layout.mask2d).shape
    n, m = shape
    try:
        br, bc = check_block(tuple(layout.block_shape), caller)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The 'layout' parameter of {caller} must have a valid "
                         f"block_shape. Got {layout.block_shape!r} instead ({exc})") from None
    if br > n or bc > m:
        raise ValueError(f"The 'layout' parameter of {caller} must have a block_shape that "
                         f"fits its shape {shape}. Got {br}x{bc} instead.")
    rows = _check_perm(layout.row_perm, n, "layout.row_perm", caller)
    cols = None if fmt == "shuffled" else _check_perm(layout.col_perm, m, "layout.col_perm",
                                                       caller)
    if fmt == "shuffled":
        P = -(-n // br)
        if not isinstance(layout.panel_cols, Sequence) or len(layout.panel_cols) != P:
            raise ValueError(f"The 'layout' parameter of {caller} must list the columns of "
                             f"its {P} panels. Got {layout.panel_cols!r:.80} instead.")
        try:
            panel_table(layout.panel_cols, m, bc)
        except ValueError as exc:
            raise ValueError(f"The 'layout' parameter of {caller} must be a valid shuffled "
                             f"layout. Got one where {exc} instead.") from None
    return fmt, shape, rows, cols, (br, bc)


def relayout(values: Any, layout: Any, k: int, *, rounds: int = 1) -> Layout:
    """A warm re-layout: the ``k`` blocks (tiles) of most ``values`` for the orders of
    ``layout`` (a grid or shuffled :class:`~regroup.blocks.Layout` or
    :class:`~regroup.LayerResult`), then at most ``rounds`` rounds of refinement moving
    rows between panels (and grid columns between groups); never less than the start.

    The search of ``regroup_pattern(from_array(values), init=layout, budget=f"blocks={k}",
    objective="magnitude", warm_rounds=rounds)``, on the dense scores as they are: no
    pattern is built and no metrics or identity baseline computed (a training loop runs
    it at mask updates, through :func:`update_layout`). ``values`` (non-negative,
    finite) has the layout's 2-D shape (N-D flattened to (d0, -1)).
    """
    caller = "relayout"
    fmt, shape, rows, cols, block = _layout_orders(layout, caller)
    V = _check_2d(values, shape, "values", caller, whose="the layout's")
    if (V < 0).any():
        raise ValueError(f"The 'values' parameter of {caller} must be non-negative (masses). "
                         f"Got {int(np.count_nonzero(V < 0))} negative values instead.")
    k = check_int(k, "k", caller, low=1)
    rounds = check_int(rounds, "rounds", caller, low=0)
    return _warm(V, rows, cols, block, fmt, k, rounds)


def _warm(V: np.ndarray, rows: np.ndarray, cols: np.ndarray | None, block: tuple[int, int],
          fmt: str, k: int, rounds: int) -> Layout:
    # A blocks=k budget reads no nonzero count (only "iso" does): 0 saves counting V.
    return warm_start(V, rows, cols, block, fmt, Budget.parse(f"blocks={k}"), 0,
                      rounds=rounds)[1]


def units_for_density(units: Units, density: float) -> int:
    """Units to keep for a layer at ``density``: ``ceil(density * n_rows * n_cols /
    (br * bc))`` (DSB's tile budget), at most every unit."""
    u = _as_units(units, "units_for_density")
    density = check_real(density, "density", "units_for_density", 0, 1)
    n, m = u.shape
    br, bc = u.block_shape
    return min(int(math.ceil(density * n * m / (br * bc) * (1 - 1e-12))), u.n_units)


# -- drop and grow -----------------------------------------------------------------------------
class DropGrow(NamedTuple):
    """The result of :func:`drop_grow`.

    kept : ndarray of bool
        The new kept set (same shape as the input's; as many kept as before).
    dropped : ndarray of intp
        Flat indices of the dropped units, smallest weight score first.
    grown : ndarray of intp
        Flat indices of the grown units, largest gradient score first. A unit in both
        was dropped and regrown: it stays kept, and RigL's code keeps its weights (its
        default ``reinit_when_same=False``: only connections absent before restart at 0).
    """

    kept: np.ndarray
    dropped: np.ndarray
    grown: np.ndarray


def drop_grow(weight_scores: Any, grad_scores: Any, kept: Any, n: int, *,
              regrow: bool = True) -> DropGrow:
    """RigL's update on units: drop the ``n`` kept units with the smallest weight score,
    then grow ``n`` units not kept with the largest gradient score.

    Parameters
    ----------
    weight_scores, grad_scores : array-like of float, same shape as ``kept``
        E.g. :func:`unit_scores` of the weights and of the dense gradient. NaN refused.
    kept : array-like of bool
        The kept units (any shape; indices are flat, C order).
    n : int in [0, kept.sum()]
        Units to drop and to grow (:func:`drop_count`).
    regrow : bool, default=True
        Whether a unit just dropped may be grown again in the same update. RigL's code
        allows it (grow candidates are the units not kept *after* the drop); False
        grows only units that were not kept before (then ``n`` may not exceed them).

    Returns
    -------
    DropGrow
        ``(kept, dropped, grown)``. Ties break by index, lower first (stable sorts), so
        the result is deterministic.
    """
    caller = "drop_grow"
    k = np.asarray(kept)
    if k.dtype != np.bool_:
        raise TypeError(f"The 'kept' parameter of {caller} must be a bool array. Got dtype "
                        f"{k.dtype} instead.")
    flat_kept = k.ravel()
    scores = []
    for name, s in (("weight_scores", weight_scores), ("grad_scores", grad_scores)):
        a = np.asarray(s, dtype=float)
        if a.shape != k.shape or np.isnan(a).any():
            raise ValueError(f"The {name!r} parameter of {caller} must be an array of "
                             f"numbers (no NaN) of the shape of 'kept', {k.shape}. Got shape "
                             f"{a.shape}{' with NaN' if a.shape == k.shape else ''} instead.")
        scores.append(a.ravel())
    ws, gs = scores
    n_kept = int(flat_kept.sum())
    free_before = flat_kept.size - n_kept
    high = n_kept if regrow else min(n_kept, free_before)
    n = check_int(n, "n", caller, low=0, high=high)
    on = np.flatnonzero(flat_kept)
    # lexsort: last key first; the index as the last tie-breaker makes ties stable.
    dropped = on[np.lexsort((on, ws[on]))[:n]]
    new = flat_kept.copy()
    new[dropped] = False
    pool = np.flatnonzero(~new if regrow else ~flat_kept)
    grown = pool[np.lexsort((pool, -gs[pool]))[:n]]
    new[grown] = True
    return DropGrow(new.reshape(k.shape), dropped.astype(np.intp), grown.astype(np.intp))


def churn(old: Any, new: Any, values: Any) -> float:
    """The share of the kept mass that an update removes: ``values[old & ~new].sum() /
    values[old].sum()`` (0 when nothing was kept).

    ``old`` and ``new`` are bool arrays of one shape: element masks, or kept-unit arrays.
    ``values`` (same shape) is the mass per position, used as given and never negative:
    ``w**2`` for element masks (the squared Frobenius mass drop and grow rank by), or
    :func:`unit_scores` for kept-unit arrays. Positions kept only by ``new`` add nothing:
    in training they restart at 0. A drop of ``n`` of ``K`` units by smallest score has
    churn at most ``n / K``, so ``n = drop_count(K, d)`` gives churn <= ``d``.
    """
    caller = "churn"
    a, b = np.asarray(old), np.asarray(new)
    v = np.asarray(values, dtype=float)
    if a.dtype != np.bool_ or b.dtype != np.bool_ or a.shape != b.shape \
            or v.shape != a.shape:
        raise ValueError(f"The 'old' and 'new' parameters of {caller} must be bool arrays "
                         f"of the shape of 'values', {v.shape}. Got shapes {a.shape}, "
                         f"{b.shape} and dtypes {a.dtype}, {b.dtype} instead.")
    if not np.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"The 'values' parameter of {caller} must be a finite mass >= 0 "
                         "(pass w**2 or |w|, not signed weights). Got negative or non-finite "
                         "entries instead.")
    total = float(v[a].sum())
    if total == 0:
        return 0.0
    return float(v[a & ~b].sum()) / total


# -- one update --------------------------------------------------------------------------------
class LayoutUpdate(NamedTuple):
    """The result of :func:`update_layout`.

    layout : Layout
        The new layout (after drop and grow, re-laid out when that was accepted).
    mask : ndarray of bool
        Its refilled mask, in the layer's 2-D shape.
    kept : int
        Units kept (before and after: drop and grow trade one for one).
    dropped, grown : int
        Units dropped and grown (a unit dropped and regrown counts in both).
    relayout : bool or None
        Whether a re-layout was accepted; None when none was tried.
    note : str or None
        Why a re-layout was refused, or its gain.
    churn : float
        The share of the kept ``w**2`` the update removed (:func:`churn`).
    """

    layout: Layout
    mask: np.ndarray
    kept: int
    dropped: int
    grown: int
    relayout: bool | None
    note: str | None
    churn: float


def update_layout(weight: Any, grad: Any, layout: Any, fraction: float, *,
                  relayout: bool = False, rounds: int = 1) -> LayoutUpdate:
    """One RigL-style update of a block layout, with an optional warm re-layout: the
    mask update of :class:`regroup.adapters.torch.RegroupDST`, torch-free.

    1. Units (:func:`layout_units`, free columns ranked by ``grad``): drop the
       ``drop_count(K, fraction)`` kept units of least ``||W_u||_F^2``, grow as many of
       the others by ``||G_u||_F^2`` (:func:`drop_grow`). A layout keeping every unit is
       left as it is.
    2. With ``relayout``: score the positions kept from before by ``w**2`` and the
       others by ``(s * g)**2``, ``s`` making the grown positions (or, with none, the
       best free unit) as large as an average kept weight, as DSB scores grown weights
       at the mean ``|w|``; re-lay out these scores from the current orders
       (:func:`relayout`, ``rounds``) and accept the result only if it keeps more of
       them (by more than :data:`RTOL`) and its churn stays <= ``fraction``. The scores
       are the squared (Frobenius) mass that step 1 ranks units by and churn measures.

    Parameters
    ----------
    weight, grad : array-like of shape (n_rows, n_cols)
        The layer's dense weight (positions outside ``layout`` count as 0) and the dense
        gradient of the loss with respect to the masked weight (N-D flattened to
        ``(d0, -1)``); finite.
    layout : Layout or LayerResult
        The current grid or shuffled layout.
    fraction : float in [0, 1]
        The drop fraction d_t (:func:`drop_fraction`).
    relayout : bool, default=False
        Whether to try step 2 (the drop and grow of step 1 is always done).
    rounds : int >= 0, default=1
        Refinement rounds of the re-layout.

    Returns
    -------
    LayoutUpdate
        Churn <= ``fraction`` (up to :data:`RTOL`); the mask is checked to be a union of
        whole units of the new layout (:func:`regroup.check_layout`).
    """
    caller = "update_layout"
    fmt, shape, rows, cols, (br, bc) = _layout_orders(layout, caller)
    d = check_real(fraction, "fraction", caller, 0, 1)
    rounds = check_int(rounds, "rounds", caller, low=0)
    if not isinstance(relayout, (bool, np.bool_)):
        raise TypeError(f"The 'relayout' parameter of {caller} must be a bool. Got "
                        f"{relayout!r} instead.")
    n, m = shape
    P = -(-n // br)
    old = layout_mask(layout) if isinstance(layout, Layout) else \
        np.asarray(layout.mask2d, dtype=bool)
    Wv = _matrix_view(weight, shape, "weight", caller, whose="the layout's")
    Gv = _matrix_view(grad, shape, "grad", caller, whose="the layout's")
    _check_finite(Gv, "grad", caller, np.shape(grad))
    # The weight is read at the kept positions only (a few % of a sparse layer), in
    # panel order, so that its panel sums (bincounts) add what group_sums adds in the
    # same order; the gradient is dense and summed from one gathered copy, squared in
    # place (full-size temporaries are what updates of small layers spend time on).
    at, c = np.divmod(np.flatnonzero(old[rows]), m)
    w = Wv[rows[at], c].astype(np.float64)
    _check_finite(w, "weight", caller, np.shape(weight))
    key = at // br * m + c
    abs_w, sq_w, count = (np.bincount(key, weights=x, minlength=P * m).reshape(P, m)
                          for x in (np.abs(w), np.square(w), None))
    sq_g = row_group_sums(Gv, rows, br, square=True)
    if fmt == "shuffled":
        u = _shuffled_units(shape, (br, bc), rows, layout.panel_cols, sq_g)
    else:
        u = Units("grid", (br, bc), shape, rows, np.broadcast_to(cols, (P, m)))
    tiles = np.stack([abs_w, sq_w, sq_g, count])
    mass, ws, gs, count = group_sums(np.take_along_axis(
        tiles, np.broadcast_to(u.col_orders, tiles.shape), axis=2), bc, 2)
    kept = _whole(count, u, caller)
    k = int(kept.sum())
    whole = k == u.n_units          # nothing to grow (RigL leaves dense layers be)
    dg = drop_grow(ws, gs, kept, 0 if whole else drop_count(k, d))
    cur = units_layout(u, dg.kept, mass)
    cur_mask = layout_mask(cur)
    done, ok, note = cur, None, None
    if relayout and not whole:
        done, ok, note = _try_relayout(Wv, Gv, u, dg.kept, old, cur, cur_mask, k, d, rounds)
    new = cur_mask if done is cur else layout_mask(done)
    check_layout(new, done.format, done.block_shape, done.row_perm, done.col_perm,
                 done.panel_cols)
    return LayoutUpdate(done, new, k, int(dg.dropped.size), int(dg.grown.size), ok, note,
                        _sq_churn(Wv, old, new))


def _sq_churn(W: np.ndarray, old: np.ndarray, new: np.ndarray) -> float:
    """:func:`churn` of the element masks with ``values = W**2`` (W in any float
    dtype), reading only the kept positions: the same sums, to the bit."""
    total = float(np.square(W[old].astype(np.float64)).sum())
    return float(np.square(W[old & ~new].astype(np.float64)).sum()) / total if total \
        else 0.0


def _try_relayout(W: np.ndarray, G: np.ndarray, u: Units, kept: np.ndarray,
                  old: np.ndarray, cur: Layout, mask: np.ndarray, k: int, d: float,
                  rounds: int) -> tuple[Layout, bool, str]:
    """:func:`update_layout`'s step 2: the re-layout of ``cur`` (mask ``mask``, the
    layout after drop and grow), or ``cur`` and why not."""
    carried = mask & old
    fresh = mask & ~old
    V = np.abs(G, dtype=np.float64)
    if fresh.any():
        g_ref = float(V[fresh].mean())
    else:
        per_unit = unit_scores(V, u, power=1) / u.area()
        g_ref = float(per_unit[~kept].max()) if (~kept).any() else 0.0
    w_carried = np.abs(W[carried].astype(np.float64))
    w_ref = float(w_carried.mean()) if w_carried.size else 0.0
    scale = w_ref / g_ref if g_ref > 0 else 0.0
    np.multiply(V, scale, out=V)
    V[carried] = w_carried
    # Keep the most w**2, the mass drop and grow rank units by and churn measures
    # (against |w| on digits: +0.37 points on the 20 seeds it was chosen on, -0.22 on
    # the 10 held out, p = 0.19: not separable; benchmarks/README.md).
    np.square(V, out=V)
    if not V.any():
        return cur, False, "nothing to score (zero weights and gradient)"
    lay = _warm(V, u.row_perm, u.col_perm, u.block_shape, u.format, k, rounds)
    if lay.kept_blocks != k:          # fewer units than k hold any score
        return cur, False, f"keeps {lay.kept_blocks} units, not {k}"
    new = layout_mask(lay)
    before, after = float(V[mask].sum()), float(V[new].sum())
    if not after > before * (1 + RTOL):
        return cur, False, "no gain"
    c = _sq_churn(W, old, new)
    if c > d * (1 + RTOL):
        return cur, False, f"churn {c:.4f} > d_t {d:.4f}"
    return lay, True, f"gain {after / before - 1:+.4f}" if before else "gain"
