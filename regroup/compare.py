"""Compare partitioners on files: methods x files -> one row per (file, layer, method)."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine import regroup_pattern
from .io import read_patterns
from .options import RegroupOptions, resolve_options

__all__ = ["compare", "summarize", "COLUMNS", "SUMMARY_COLUMNS"]

COLUMNS = ("file", "layer", "rows", "cols", "nnz", "method", "format", "block", "seed",
           "retained", "retained_identity", "ratio_identity", "kept_blocks", "fill", "km1",
           "seconds")
SUMMARY_COLUMNS = ("method", "layers", "mean_retained", "mean_ratio_identity",
                   "wins_vs_identity", "total_seconds")


def compare(paths: Sequence[str], methods: Sequence[str], *,
            options: RegroupOptions | None = None,
            progress: Callable[[str, int, int], None] | None = None,
            on_skip: Callable[[str, str, str], None] | None = None,
            **kwargs: Any) -> list[dict]:
    """Run every method on every usable layer of every file; one dict per run.

    ``options`` (and keyword arguments naming its fields) set everything but the method,
    which each entry of ``methods`` replaces. The layers are those ``regroup run`` takes
    (:func:`regroup.io.read_patterns` with the block, ``dense_above`` and the embedding
    rule); ``on_skip(file, name, reason)`` is called for every other tensor.
    ``progress(label, done, total, info)`` is called as each run finishes (total counts
    the runs of the current file; ``info`` as in :mod:`regroup.pipeline`'s progress).

    Raises
    ------
    RegroupError
        A file without a usable layer (the reasons listed), as ``regroup run``.
    """
    opts = resolve_options(options, "compare", **kwargs)
    opts.refuse_chain("compare")
    if opts.budget_scope != "layer":
        raise ValueError("The 'budget_scope' parameter of compare must be 'layer': compare "
                         "scores every layer on its own. Got 'global' instead.")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"The 'methods' parameter of compare must be a non-empty list of "
                         f"method specs. Got {methods!r} instead.")
    runs = [opts.replace("compare", method=m).per_layer() for m in methods]
    rows = []
    for path in paths:
        patterns, skipped = read_patterns(path, layers=opts.layers, block=opts.block,
                                          dense_above=opts.dense_above, nm=opts.nm)
        if on_skip is not None:
            for name, reason in skipped:
                on_skip(str(path), name, reason)
        total = len(patterns) * len(runs)
        for i, pat in enumerate(patterns):
            for j, run in enumerate(runs):
                t0 = time.perf_counter()
                r = regroup_pattern(pat, options=run)
                m = r.metrics
                rows.append({
                    "file": str(path), "layer": pat.name, "rows": pat.n_rows,
                    "cols": pat.n_cols, "nnz": pat.nnz, "method": run.method,
                    "format": run.format, "block": "x".join(map(str, r.block_shape)),
                    "seed": run.seed,
                    "retained": m["retained"], "retained_identity": m["retained_identity"],
                    "ratio_identity": (m["retained"] / m["retained_identity"]
                                       if m["retained_identity"] else None),
                    # (an N:M layer has neither blocks nor panels)
                    "kept_blocks": m.get("kept_blocks"), "fill": m["fill"],
                    "km1": m.get("km1"),
                    "seconds": time.perf_counter() - t0})
                if progress is not None:
                    progress(f"{os.path.basename(path)}:{pat.name}:{run.method}",
                             i * len(runs) + j + 1, total,
                             {"status": "done", "shape": pat.shape, "cached": False,
                              "seconds": rows[-1]["seconds"], "retained": m["retained"],
                              "reason": None})
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per method: mean retained, mean ratio to identity, layers where it beats identity."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    out = []
    for method, rs in by.items():
        ratios = [r["ratio_identity"] for r in rs if r["ratio_identity"] is not None]
        out.append({
            "method": method, "layers": len(rs),
            "mean_retained": float(np.mean([r["retained"] for r in rs])),
            "mean_ratio_identity": float(np.mean(ratios)) if ratios else None,
            "wins_vs_identity": sum(r["retained"] > r["retained_identity"] + 1e-12
                                    for r in rs),
            "total_seconds": float(sum(r["seconds"] for r in rs))})
    return out
