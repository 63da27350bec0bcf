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
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from .blocks import Budget, assemble, build_layout, candidates, layout_mask, select_blocks
from .metrics import layer_metrics
from .pattern import Pattern
from .result import LayerResult

__all__ = ["Offer", "layer_offer", "allot", "apply_allotment", "allocate_global"]


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


@dataclass(frozen=True, eq=False)
class Offer:
    """What one layer puts up for a model-wide budget: the objective mass and area of
    every candidate block under its own (fixed) permutations, its matrix shape and nnz.
    Small (one number per block), so a streamed run gathers every layer's offer."""

    mass: np.ndarray
    area: np.ndarray
    shape: tuple[int, int]
    nnz: int


def layer_offer(pattern: Pattern, result: LayerResult) -> Offer:
    """The candidate blocks of ``pattern`` under ``result``'s permutations."""
    c = candidates(_objective(pattern, result), result.row_perm, result.col_perm,
                   result.block_shape, result.format)
    return Offer(c.mass, c.area, c.shape, pattern.nnz)


def allot(offers: list[Offer], budget: Budget, *, layer_min: float = 0.0
          ) -> list[np.ndarray]:
    """Spend the model-wide ``budget`` over every layer's candidate blocks.

    Parameters
    ----------
    offers : list of Offer
        One per layer (:func:`layer_offer`).
    budget : Budget
        Read model-wide: ``iso=F`` allows F x the total nnz as block area, ``density=D``
        D x all layers' elements, ``blocks=K`` K x the number of layers blocks,
        ``retained=R`` the fewest blocks keeping R of the total objective mass.
    layer_min : float in [0, 1], default=0
        Share of each layer's own per-layer budget reserved for it first.

    Returns
    -------
    list of ndarray of bool
        Per layer, the kept candidate blocks (shape of its ``mass``).
    """
    if not 0.0 <= layer_min <= 1.0:
        raise ValueError(f"The 'layer_min' parameter of allot must be in [0, 1]. "
                         f"Got {layer_min!r} instead.")
    if not offers:
        return []
    reserve = _scaled(budget, layer_min)
    forced = [(select_blocks(o.mass, o.area, reserve, o.nnz, *o.shape) if reserve is not None
               else np.zeros(o.mass.shape, bool)) for o in offers]
    mass = np.concatenate([np.where(f, 0.0, o.mass).ravel() for o, f in zip(offers, forced)])
    area = np.concatenate([o.area.ravel() for o in offers])
    used_area = sum(int(o.area[f].sum()) for o, f in zip(offers, forced))
    used_blocks = sum(int(f.sum()) for f in forced)
    used_mass = sum(float(o.mass[f].sum()) for o, f in zip(offers, forced))
    total_nnz = sum(o.nnz for o in offers)
    total_elems = sum(o.shape[0] * o.shape[1] for o in offers)
    if budget.kind == "iso":
        rest = Budget("iso")
        limit = (budget.value or 1.0) * total_nnz - used_area
    elif budget.kind == "density":
        rest, limit = Budget("iso"), budget.value * total_elems - used_area
    elif budget.kind == "blocks":
        k = int(budget.value) * len(offers) - used_blocks
        rest, limit = (Budget("blocks", k) if k >= 1 else None), 0
    else:
        total_mass = sum(float(o.mass.sum()) for o in offers)
        left = float(mass.sum())
        need = budget.value * total_mass - used_mass
        rest = Budget("retained", min(1.0, need / left)) if need > 0 and left > 0 else None
        limit = 0
    chosen = (select_blocks(mass, area, rest, max(limit, 0), 1, 1) if rest is not None
              and (budget.kind in ("blocks", "retained") or limit > 0)
              else np.zeros(mass.size, bool))
    out, offset = [], 0
    for o, f in zip(offers, forced):
        size = o.mass.size
        out.append(f | chosen[offset:offset + size].reshape(o.mass.shape))
        offset += size
    return out


def apply_allotment(pattern: Pattern, result: LayerResult, kept: np.ndarray,
                    budget: Budget, *, layer_min: float = 0.0, refine: bool = False,
                    rows: bool = True, cols: bool = True,
                    time_limit: float | None = None) -> LayerResult:
    """``result`` re-laid with the blocks ``kept`` (from :func:`allot`), refined at the
    area it was allotted when ``refine`` (never lowering it; ``rows`` / ``cols`` False
    keep that order, and ``time_limit`` caps it, as in :func:`regroup.refine.refine`);
    metrics gain
    ``budget_scope="global"``, ``allotted_area`` and ``layer_min``, and
    ``retained_identity`` is measured at the allotted area."""
    from .refine import refine as local_search

    V = _objective(pattern, result)
    c = candidates(V, result.row_perm, result.col_perm, result.block_shape, result.format)
    kept = np.asarray(kept, bool)
    if kept.shape != c.mass.shape:
        raise ValueError(f"The 'kept' parameter of apply_allotment must have shape "
                         f"{c.mass.shape} for layer {result.name!r}. Got {kept.shape} instead.")
    lay = assemble(c, kept)
    allotted = Budget("density", lay.kept_area / (c.shape[0] * c.shape[1])) \
        if lay.kept_area else None
    if refine and allotted is not None:
        lay = local_search(V, lay, allotted, pattern.nnz, rows=rows, cols=cols,
                           time_limit=time_limit)
    n, m = c.shape
    identity = (build_layout(V, np.arange(n), np.arange(m), result.block_shape, result.format,
                             allotted, pattern.nnz) if allotted is not None else
                assemble(candidates(V, np.arange(n), np.arange(m), result.block_shape,
                                    result.format), np.zeros(c.mass.shape, bool)))
    metrics = {**result.metrics, **layer_metrics(pattern, lay, identity),
               "budget": str(budget), "budget_scope": "global", "layer_min": layer_min,
               "allotted_area": lay.kept_area}
    return replace(result, mask=pattern.unflatten(layout_mask(lay)), row_perm=lay.row_perm,
                   col_perm=lay.col_perm, panel_cols=lay.panel_cols, metrics=metrics)


def allocate_global(pairs: list[tuple[Pattern, LayerResult]], budget: Budget, *,
                    layer_min: float = 0.0, refine: bool = False) -> list[LayerResult]:
    """Re-choose the kept blocks of every layer under one model-wide ``budget``, in
    memory: :func:`allot` over every layer's :func:`layer_offer`, then
    :func:`apply_allotment` per layer (what the streamed pipeline does in two passes).

    ``pairs`` holds every layer with its own (per-layer budget) result; permutations are
    kept. Returns the new results in input order.
    """
    kept = allot([layer_offer(p, r) for p, r in pairs], budget, layer_min=layer_min)
    return [apply_allotment(p, r, k, budget, layer_min=layer_min, refine=refine)
            for (p, r), k in zip(pairs, kept)]
