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

from .blocks import Layout, group_indicator, layout_mask
from .hypergraph import column_net, km1
from .pattern import Pattern

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


def panel_km1(matrix: sp.csr_matrix, row_perm: np.ndarray, br: int) -> int:
    """km1 of the partition of rows into consecutive panels of ``row_perm``."""
    labels = group_indicator(row_perm, br).indices   # one entry per row: its panel
    return km1(column_net(matrix), labels)


def layer_metrics(pattern: Pattern, lay: Layout, identity: Layout) -> dict[str, Any]:
    """The metrics above for the layout ``lay`` of ``pattern`` (and the ``identity``
    layout of the same format and budget)."""
    B = pattern.binary()
    mask2d = layout_mask(lay)
    br = lay.block_shape[0]
    return {
        "nnz": pattern.nnz,
        "density": pattern.density,
        "retained": retained(B, mask2d),
        "retained_magnitude": retained(pattern.matrix, mask2d) if pattern.has_weights else None,
        "retained_identity": retained(B, layout_mask(identity)),
        "kept_blocks": lay.kept_blocks,
        "kept_area": lay.kept_area,
        "fill": fill(B, mask2d),
        "km1": panel_km1(B, lay.row_perm, br),
        "km1_identity": panel_km1(B, identity.row_perm, br),
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
