"""Pictures of one layer before and after regrouping (matplotlib, imported lazily)."""
from __future__ import annotations

import os

import numpy as np

from ._atomic import atomic_write
from ._validation import missing_dependency
from .pattern import Pattern
from .result import LayerResult

__all__ = ["plot_layer"]


def _regrouped_view(pattern: Pattern, result: LayerResult) -> tuple[np.ndarray, np.ndarray]:
    """(input nonzeros, kept mask) in regrouped coordinates. Shuffled panels show their
    kept tiles first, left-justified, then the remaining columns in natural order."""
    dense = pattern.matrix.toarray() != 0
    kept = result.mask2d
    rp = result.row_perm
    if result.format == "grid":
        return dense[np.ix_(rp, result.col_perm)], kept[np.ix_(rp, result.col_perm)]
    br = result.block_shape[0]
    n, m = dense.shape
    view, kview = np.zeros_like(dense), np.zeros_like(kept)
    for p, cols in enumerate(result.panel_cols):
        rows = rp[p * br:(p + 1) * br]
        rest = np.setdiff1d(np.arange(m), cols, assume_unique=True)
        order = np.concatenate([cols, rest]).astype(np.intp)
        view[p * br:p * br + rows.size] = dense[np.ix_(rows, order)]
        kview[p * br:p * br + rows.size] = kept[np.ix_(rows, order)]
    return view, kview


def plot_layer(pattern: Pattern, result: LayerResult, path: str | os.PathLike, *,
               dpi: int = 120) -> None:
    """Save a PNG: the input mask, and the regrouped mask with kept blocks shaded.

    Black: input nonzeros. Left: original order. Right: rows (and, for grid, columns)
    permuted; kept blocks are shaded blue, so black outside blue is dropped and blue
    without black is refilled.
    """
    try:
        # A bare Figure (no pyplot): no global backend switch, no figure registry; its
        # savefig renders through Agg.
        from matplotlib.figure import Figure
    except ImportError:
        raise missing_dependency("matplotlib", "regroup show") from None
    before = pattern.matrix.toarray() != 0
    after, kept = _regrouped_view(pattern, result)
    n, m = before.shape
    aspect = n / m
    fig = Figure(figsize=(12, max(3.0, min(12.0, 6 * aspect)) + 0.8))
    axes = fig.subplots(1, 2)
    m_ = result.metrics
    titles = [f"input: {pattern.name} {n}x{m}, nnz {pattern.nnz}",
              f"{result.format} {result.block_shape[0]}x{result.block_shape[1]}, "
              f"{m_['chosen']}: retained {m_['retained']:.3f} "
              f"(identity {m_['retained_identity']:.3f})"]
    for ax, img, title in zip(axes, (before, after), titles):
        rgb = np.ones((n, m, 3))
        if img is after:
            rgb[kept] = (0.75, 0.85, 1.0)
        rgb[img] = (0.0, 0.0, 0.0)
        ax.imshow(rgb, interpolation="nearest", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("columns (input features)")
        ax.set_ylabel("rows (output features)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
