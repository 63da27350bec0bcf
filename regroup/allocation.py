"""A model-wide block budget: one budget for all layers, spent where blocks retain most.

Like global magnitude pruning, the layers compete: every layer is first regrouped on its
own (its permutations fixed), then all candidate blocks of all layers are ranked by their
objective mass (nonzero count, or raw ``sum |w|`` with the magnitude objective, compared
across layers as global magnitude pruning compares weights) and taken greedily until the
total budget is spent. ``layer_min`` first reserves, in every layer, that fraction of what
its own per-layer budget would have kept, so that no layer is emptied. With refinement on
(auto), each layer's layout is then refined at the area it was allotted.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from .blocks import Budget, _select, assemble, build_layout, candidates, layout_mask
from .pattern import Pattern
from .result import LayerResult

__all__ = ["allocate_global"]


def _scaled(budget: Budget, f: float) -> Budget | None:
    """The per-layer budget times ``f`` (None when that keeps nothing)."""
    if f <= 0:
        return None
    if budget.kind == "iso":
        return Budget("iso", (budget.value or 1.0) * f)
    if budget.kind == "blocks":
        k = math.floor(budget.value * f)
        return Budget("blocks", k) if k >= 1 else None
    return Budget(budget.kind, budget.value * f)


def _objective(pattern: Pattern, result: LayerResult) -> sp.csr_matrix:
    return pattern.matrix if result.metrics["objective"] == "magnitude" else pattern.binary()


def allocate_global(pairs: list[tuple[Pattern, LayerResult]], budget: Budget, *,
                    layer_min: float = 0.0, refine: bool = False) -> list[LayerResult]:
    """Re-choose the kept blocks of every layer under one model-wide ``budget``.

    Parameters
    ----------
    pairs : list of (Pattern, LayerResult)
        Every layer with its own (per-layer budget) result; permutations are kept.
    budget : Budget
        Read model-wide: ``iso=F`` allows F x the total nnz as block area, ``density=D``
        D x all layers' elements, ``blocks=K`` K x the number of layers blocks,
        ``retained=R`` the fewest blocks keeping R of the total objective mass.
    layer_min : float in [0, 1], default=0
        Share of each layer's own per-layer budget reserved for it first.
    refine : bool, default=False
        Refine each layer's layout at its allotted area afterwards (never lowers a layer).

    Returns
    -------
    list of LayerResult, in input order; ``metrics`` gain ``budget_scope="global"``,
    ``allotted_area`` and ``layer_min``; ``retained_identity`` is measured at the allotted
    area.
    """
    from .engine import layer_metrics
    from .refine import refine as local_search

    if not 0.0 <= layer_min <= 1.0:
        raise ValueError(f"The 'layer_min' parameter of allocate_global must be in [0, 1]. "
                         f"Got {layer_min!r} instead.")
    values = [_objective(p, r) for p, r in pairs]
    cands = [candidates(V, r.row_perm, r.col_perm, r.block_shape, r.format)
             for V, (p, r) in zip(values, pairs)]
    reserve = _scaled(budget, layer_min)
    forced = [(_select(c.mass, c.area, reserve, p.nnz, *c.shape) if reserve is not None
               else np.zeros(c.mass.shape, bool)) for c, (p, _) in zip(cands, pairs)]
    mass = np.concatenate([np.where(f, 0.0, c.mass).ravel() for c, f in zip(cands, forced)])
    area = np.concatenate([c.area.ravel() for c in cands])
    used_area = sum(int(c.area[f].sum()) for c, f in zip(cands, forced))
    used_blocks = sum(int(f.sum()) for f in forced)
    used_mass = sum(float(c.mass[f].sum()) for c, f in zip(cands, forced))
    total_nnz = sum(p.nnz for p, _ in pairs)
    total_elems = sum(c.shape[0] * c.shape[1] for c in cands)
    if budget.kind == "iso":
        rest = Budget("iso")
        limit = (budget.value or 1.0) * total_nnz - used_area
    elif budget.kind == "density":
        rest, limit = Budget("iso"), budget.value * total_elems - used_area
    elif budget.kind == "blocks":
        k = int(budget.value) * len(pairs) - used_blocks
        rest, limit = (Budget("blocks", k) if k >= 1 else None), 0
    else:
        total_mass = sum(float(c.mass.sum()) for c in cands)
        left = float(mass.sum())
        need = budget.value * total_mass - used_mass
        rest = Budget("retained", min(1.0, need / left)) if need > 0 and left > 0 else None
        limit = 0
    chosen = (_select(mass, area, rest, max(limit, 0), 1, 1) if rest is not None
              and (budget.kind in ("blocks", "retained") or limit > 0)
              else np.zeros(mass.size, bool))
    out, offset = [], 0
    for V, c, f, (p, r) in zip(values, cands, forced, pairs):
        size = c.mass.size
        kept = f | chosen[offset:offset + size].reshape(c.mass.shape)
        offset += size
        lay = assemble(c, kept)
        allotted = Budget("density", lay.kept_area / (c.shape[0] * c.shape[1])) \
            if lay.kept_area else None
        if refine and allotted is not None:
            lay = local_search(V, lay, allotted, p.nnz)
        n, m = c.shape
        identity = (build_layout(V, np.arange(n), np.arange(m), r.block_shape, r.format,
                                 allotted, p.nnz) if allotted is not None else
                    assemble(candidates(V, np.arange(n), np.arange(m), r.block_shape,
                                        r.format), np.zeros(c.mass.shape, bool)))
        metrics = {**r.metrics, **layer_metrics(p, lay, identity),
                   "budget": str(budget), "budget_scope": "global", "layer_min": layer_min,
                   "allotted_area": lay.kept_area}
        out.append(replace(r, mask=p.unflatten(layout_mask(lay)), row_perm=lay.row_perm,
                           col_perm=lay.col_perm, panel_cols=lay.panel_cols,
                           metrics=metrics))
    return out
