"""Pictures (matplotlib, imported lazily): one layer before and after regrouping, and a
budget sweep's retained and speed-up against block density."""
from __future__ import annotations

import os
import textwrap
from typing import TYPE_CHECKING

import numpy as np

from ._atomic import atomic_write
from .validation import missing_dependency
from .pattern import Pattern
from .result import LayerResult

if TYPE_CHECKING:
    from .sweep import Sweep

__all__ = ["plot_layer", "plot_sweep"]


def _regrouped_view(pattern: Pattern, result: LayerResult) -> tuple[np.ndarray, np.ndarray]:
    """(input nonzeros, kept mask) in regrouped coordinates. Shuffled panels show their
    kept tiles first, left-justified, then the remaining columns in natural order."""
    dense = pattern.matrix.toarray() != 0
    kept = result.mask2d
    rp = result.row_perm
    if result.col_perm is not None:     # grid, and nm (whose row_perm is the identity)
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
    layout = (f"nm {result.nm[0]}:{result.nm[1]}" if result.nm is not None else
              f"{result.format} {result.block_shape[0]}x{result.block_shape[1]}")
    titles = [f"input: {pattern.name} {n}x{m}, nnz {pattern.nnz}",
              f"{layout}, {m_['chosen']}: retained {m_['retained']:.3f} "
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


def plot_sweep(result: Sweep, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """Save a PNG of a budget sweep (:func:`regroup.sweep.sweep`), for the model.

    Left: retained against block density, one line per method (retained ``|w|`` when
    ``result.magnitude``, else the retained nonzero count), each point labelled with
    its budget. Right: the CPU speed-up (dense time / block-sparse time; 1x dashed)
    against block density; or why it was not measured. Budgets of one kind (density,
    iso, ...) are joined by a line, each kind with its own marker.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise missing_dependency("matplotlib", "regroup sweep --plot") from None
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    key = "retained_magnitude" if result.magnitude else "retained"
    measured = result.speed.get("measured")
    styles = ("-", "--", ":", "-.")
    markers = {"density": "o", "iso": "s", "blocks": "^", "retained": "D"}
    colors = [f"C{i}" for i in range(10)]
    for i, method in enumerate(result.methods):
        color, style = colors[i % len(colors)], styles[i % len(styles)]
        rows = [r for r in result.model if r["method"] == method]
        # One line per kind of budget: iso=F follows each layer's density, so an iso
        # point is not between the density points beside it (it spends area elsewhere).
        kinds: dict[str, list[dict]] = {}
        for r in rows:
            kinds.setdefault(r["budget"].partition("=")[0], []).append(r)
        for k, (kind, group) in enumerate(kinds.items()):
            group = sorted(group, key=lambda r: r["block_density"])
            x = [r["block_density"] for r in group]
            label = method if k == 0 else None
            left.plot(x, [r[key] for r in group], marker=markers.get(kind, "o"), color=color,
                      linestyle=style, label=label)
            if measured:
                right.plot(x, [r["speedup"] for r in group], marker=markers.get(kind, "o"),
                           color=color, linestyle=style, label=label)
        # Budgets that land on the same point share a label.
        labels: dict[tuple[float, float], list[str]] = {}
        for r in rows:
            labels.setdefault((round(r["block_density"], 4), round(r[key], 4)),
                              []).append(r["budget"])
        for (bx, by), names in labels.items():
            left.annotate(" / ".join(names), (bx, by), fontsize=7, xytext=(4, -10),
                          textcoords="offset points", color=color)
    o = result.options
    left.set_xlabel("block density (kept block area / size)")
    left.set_ylabel("retained |w| share" if result.magnitude else "retained nonzero share")
    left.set_ylim(0, 1.02)
    left.set_xlim(left=0)
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    left.set_title(f"{os.path.basename(result.source)}: {o.format} {o.block[0]}x{o.block[1]}, "
                   f"{len({r['layer'] for r in result.layers})} layers", fontsize=9)
    right.set_xlabel("block density (kept block area / size)")
    right.set_ylabel("CPU speed-up over dense (x)")
    right.set_xlim(left=0)
    if measured:
        right.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        right.set_ylim(bottom=0)
        right.grid(alpha=0.3)
        right.legend(loc="upper right")
        s = result.speed
        right.set_title(f"torch BSR vs dense, fp32, batch {s['batch']}, {s['threads']} "
                        "threads", fontsize=9)
    else:
        right.text(0.5, 0.5, "speed-up not measured:\n" + textwrap.fill(
            str(result.speed.get("note")), 50), ha="center", va="center",
            transform=right.transAxes, fontsize=9)
        right.set_yticks([])
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
