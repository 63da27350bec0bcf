"""Metrics of a block layout against the input pattern.

retained
    Fraction of the input's nonzeros that lie inside kept blocks.
retained_magnitude
    Fraction of the input's ``sum |w|`` inside kept blocks (None when weights are unknown).
retained_identity
    ``retained`` of the same format and budget with no permutation (natural order).
kept_blocks, kept_area
    Number of kept blocks (tiles) and the positions they cover.
fill
    Input nonzeros inside kept blocks divided by the kept area (1 - fill is the fraction of
    kept positions that are refilled zeros).
km1
    Connectivity-minus-one of the row panels on the column-net hypergraph.

N:M layers (format "nm", :func:`nm_metrics`) have no blocks nor panels: ``retained``,
``retained_magnitude``, ``retained_identity`` (plain N:M, no permutation),
``retained_magnitude_identity``, ``kept_area`` (N/M of the matrix) and ``fill`` as above;
the engine adds ``efficacy`` (:func:`regroup.nm.efficacy`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .blocks import Layout, layout_mask, mostly_stored, positions, row_group_sums
from .pattern import Pattern
from .validation import check_int, is_permutation

__all__ = ["retained", "fill", "panel_km1", "layer_metrics", "nm_metrics"]


def retained(matrix: sp.csr_matrix, mask2d: np.ndarray) -> float:
    """Share of ``matrix``'s stored mass (its ``data``) at positions where ``mask2d`` is True."""
    coo = matrix.tocoo()
    total = coo.data.sum()
    if total == 0:
        return 0.0
    return float(coo.data[mask2d[coo.row, coo.col]].sum() / total)


def fill(matrix: sp.csr_matrix, mask2d: np.ndarray) -> float:
    """Input nonzeros inside the kept area divided by the kept area."""
    area = int(mask2d.sum())
    if area == 0:
        return 0.0
    coo = matrix.tocoo()
    return float(mask2d[coo.row, coo.col].sum() / area)


def _km1(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], row_perm: np.ndarray,
         br: int) -> int:
    """:func:`panel_km1` from the coordinates of the stored entries (no duplicates)."""
    n, m = shape
    if rows.size == 0:
        return 0
    P = -(-n // br)
    key = cols.astype(np.int64) * P + positions(row_perm)[rows] // br
    # Distinct (column, panel) pairs minus non-empty columns = sum over columns of
    # (lambda - 1). A presence table when it is small next to the entries, else a sort.
    if m * P <= 4 * key.size + (1 << 16):
        pairs = int(np.count_nonzero(np.bincount(key, minlength=m * P)))
    else:
        pairs = int(np.unique(key).size)
    return pairs - int(np.count_nonzero(np.bincount(cols, minlength=m)))


def _dense_km1(stored: np.ndarray, row_perm: np.ndarray, br: int) -> int:
    """:func:`panel_km1` from the dense 0/1 array of stored entries."""
    touched = np.count_nonzero(row_group_sums(stored, row_perm, br), axis=0)  # per column
    return int(np.sum(np.maximum(touched - 1, 0)))


def panel_km1(matrix: sp.spmatrix | Pattern, row_perm: np.ndarray, br: int) -> int:
    """km1 of the partition of rows into consecutive panels of ``row_perm``: the
    unweighted column-net ``km1`` (:func:`regroup.hypergraph.km1`), counted straight from
    the stored entries."""
    X = matrix.matrix if isinstance(matrix, Pattern) else matrix
    coo = sp.csr_matrix(X).tocoo()
    coo.sum_duplicates()
    n = coo.shape[0]
    if not is_permutation(row_perm, n):
        raise ValueError(f"The 'row_perm' parameter of panel_km1 must be a permutation of "
                         f"range({n}). Got {np.asarray(row_perm)!r} instead.")
    br = check_int(br, "br", "panel_km1", low=1)
    return _km1(coo.row, coo.col, coo.shape, np.asarray(row_perm, np.intp), br)


def layer_metrics(pattern: Pattern, lay: Layout, identity: Layout, *,
                  values: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics above for the layout ``lay`` of ``pattern`` (and the ``identity``
    layout of the same format and budget). ``values``: ``pattern.matrix`` as a dense
    float64 array when the caller has one (the engine's summing form), read instead of
    a second copy."""
    n, m = pattern.n_rows, pattern.n_cols
    nnz = pattern.nnz
    br = lay.block_shape[0]
    mask, mask_id = layout_mask(lay), layout_mask(identity)
    mag = None
    M = pattern.matrix
    if mostly_stored(M):
        # Most entries stored: dense masks beat indexing every entry.
        W = values if values is not None and values.shape == M.shape else None
        if nnz == n * m:                  # every entry stored: no table needed
            stored = None
            n_hit = int(np.count_nonzero(mask))
            n_hit_id = int(np.count_nonzero(mask_id))
        else:
            if W is not None and np.count_nonzero(M.data) == M.nnz:
                stored = W != 0           # (no explicit zeros: stored = nonzero)
            else:                         # explicit zeros are stored entries too
                stored = sp.csr_matrix((np.ones(M.nnz, bool), M.indices, M.indptr),
                                       shape=M.shape).toarray()
            n_hit = int(np.count_nonzero(stored & mask))
            n_hit_id = int(np.count_nonzero(stored & mask_id))
        if pattern.has_weights:
            W = M.toarray() if W is None else W
            total = W.sum()
            mag = float(W[mask].sum() / total) if total != 0 else 0.0
        if stored is None:                # each column meets every row panel
            km1 = km1_id = m * (-(-n // br) - 1)
        else:
            km1 = _dense_km1(stored, lay.row_perm, br)
            km1_id = _dense_km1(stored, identity.row_perm, br)
    else:
        coo = pattern.matrix.tocoo()    # canonical: the 0/1 pattern has the same entries
        rows, cols = coo.row, coo.col
        hit = mask[rows, cols]
        n_hit = int(np.count_nonzero(hit))
        n_hit_id = int(np.count_nonzero(mask_id[rows, cols]))
        if pattern.has_weights:
            total = coo.data.sum()
            mag = float(coo.data[hit].sum() / total) if total != 0 else 0.0
        km1 = _km1(rows, cols, (n, m), lay.row_perm, br)
        km1_id = _km1(rows, cols, (n, m), identity.row_perm, br)
    area = lay.kept_area
    return {
        "nnz": nnz,
        "density": pattern.density,
        "retained": n_hit / nnz if nnz else 0.0,
        "retained_magnitude": mag,
        "retained_identity": n_hit_id / nnz if nnz else 0.0,
        "kept_blocks": lay.kept_blocks,
        "kept_area": area,
        "fill": n_hit / area if area else 0.0,
        "km1": km1,
        "km1_identity": km1_id,
    }


def nm_metrics(pattern: Pattern, mask2d: np.ndarray, identity2d: np.ndarray) -> dict[str, Any]:
    """The metrics of an N:M mask ``mask2d`` of ``pattern`` (original coordinates), and of
    plain N:M, ``identity2d`` (the same N:M without a column permutation)."""
    B = pattern.binary()
    mag = pattern.has_weights
    return {
        "nnz": pattern.nnz,
        "density": pattern.density,
        "retained": retained(B, mask2d),
        "retained_magnitude": retained(pattern.matrix, mask2d) if mag else None,
        "retained_identity": retained(B, identity2d),
        "retained_magnitude_identity": retained(pattern.matrix, identity2d) if mag else None,
        "kept_area": int(np.count_nonzero(mask2d)),
        "fill": fill(B, mask2d),
    }
