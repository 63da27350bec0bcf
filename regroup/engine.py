"""The regrouping engine: pattern in, scored block layout out.

:func:`regroup_pattern` regroups one layer; :func:`regroup_file` reads a file, regroups every
selected layer and returns a :class:`Run` that saves the result file and the JSON report.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from ._validation import (PartitionerError, RegroupError, check_block, check_choice,
                          check_int)
from .blocks import FORMATS, Budget, Layout, build_layout, group_indicator, layout_mask
from .metrics import fill, panel_km1, retained
from .partitioners import format_method, get_partitioner, parse_method
from .partitioners._isolate import run_isolated
from .partitioners._panels import check_perm
from .pattern import Pattern
from .result import LayerResult, _layer_meta, save_result

__all__ = ["regroup_pattern", "regroup_file", "Run", "tool_versions", "select_layers",
           "run_options", "report_row", "report_total", "OBJECTIVES", "EDGES"]

OBJECTIVES = ("auto", "count", "magnitude")
EDGES = ("partial", "error")
_TOOLS = ("regroup", "numpy", "scipy", "pymetis", "kahypar", "mtkahypar", "fastcluster", "torch")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of regroup and the libraries that can shape a result."""
    out = {}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _run_partitioner(name: str, params: dict, X: sp.csr_matrix, size: int,
                     rng: np.random.Generator, time_limit: float | None) -> np.ndarray:
    spec = get_partitioner(name)
    if spec.isolated or time_limit is not None:
        perm = run_isolated(name, X, size, params, int(rng.integers(0, 2**31 - 1)), time_limit)
    else:
        try:
            perm = spec.func(X, size, rng=rng, **params)
        except (PartitionerError, ImportError):
            raise
        except Exception as exc:  # a library failing inside: report it as the partitioner's
            raise PartitionerError(f"partitioner {name!r} failed: {type(exc).__name__}: "
                                   f"{exc}") from exc
    return check_perm(perm, X.shape[0], f"partitioner {name!r}")


# Column counts up to which grid columns are also clustered by their panel profiles.
PROFILE_CLUSTER_LIMIT = 4096


def group_columns(V: sp.csr_matrix, row_perm: np.ndarray, block: tuple[int, int],
                  budget: Budget, nnz: int, *, cluster: bool = True) -> np.ndarray:
    """Column order for the grid format, given the row panels.

    Two orders are scored by the objective and the better one is returned (ties: the
    first):

    - home panel: each column goes with the row panel holding most of its mass; columns
      are sorted by home panel, then by decreasing mass there (stable). Nearly free.
    - profile clustering (up to ``PROFILE_CLUSTER_LIMIT`` columns): average-linkage
      clustering of the columns' per-panel mass profiles (Tanimoto), leaf order. It
      separates columns that fill different sets of panels, which home-panel sorting
      mixes up (on planted masks it reached the planted layout where home panels missed
      it by up to 0.08 retained). Skipped when ``cluster`` is False (auto scores its
      candidates without it, then applies it to the winner).
    """
    from .partitioners.hierarchical import hierarchical

    m = V.shape[1]
    br, bc = block
    profile = (V.T @ group_indicator(row_perm, br)).tocsr()
    dense = profile.toarray()
    home = dense.argmax(axis=1)
    top = dense[np.arange(m), home]
    orders = [np.lexsort((np.arange(m), -top, home)).astype(np.intp)]
    if cluster and bc < m <= PROFILE_CLUSTER_LIMIT:
        orders.append(hierarchical(profile, bc))
    masses = [build_layout(V, row_perm, order, block, "grid", budget, nnz).kept_mass
              for order in orders]
    return orders[int(np.argmax(masses))]


def _candidate(name: str, params: dict, B: sp.csr_matrix, V: sp.csr_matrix, fmt: str,
               block: tuple[int, int], budget: Budget, nnz: int, seed: int,
               time_limit: float | None, cluster_columns: bool = True,
               fixed_rows: np.ndarray | None = None,
               fixed_cols: np.ndarray | None = None) -> Layout:
    br, bc = block
    # A fresh generator per candidate: auto's winner equals a direct run of that method.
    rng = np.random.default_rng(seed)
    row_perm = (fixed_rows if fixed_rows is not None
                else _run_partitioner(name, params, B, br, rng, time_limit))
    col_perm = None
    if fmt == "grid" and fixed_cols is not None:
        col_perm = fixed_cols
    elif fmt == "grid":
        if get_partitioner(name).columns == "self" and fixed_rows is None:
            col_perm = _run_partitioner(name, params, B.T.tocsr(), bc, rng, time_limit)
        else:
            col_perm = group_columns(V, row_perm, block, budget, nnz,
                                     cluster=cluster_columns)
    return build_layout(V, row_perm, col_perm, block, fmt, budget, nnz)


def _fixed_perm(perm: Any, n: int, what: str, caller: str) -> np.ndarray:
    try:
        return check_perm(perm, n, f"the {what!r} parameter of {caller}")
    except PartitionerError as exc:
        raise ValueError(str(exc).replace(" returned ", " is ")) from None


def layer_metrics(pattern: Pattern, lay: Layout, identity: Layout) -> dict[str, Any]:
    """The metrics of :mod:`regroup.metrics` for ``lay`` (and the identity layout)."""
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


def _validate_pattern(pattern: Pattern, block: tuple[int, int], edge: str) -> None:
    n, m = pattern.n_rows, pattern.n_cols
    br, bc = block
    if pattern.nnz == 0:
        raise RegroupError(f"{pattern.describe()} is empty (no nonzero): nothing to regroup")
    if pattern.nnz == n * m:
        raise RegroupError(f"{pattern.describe()} is fully dense (no pruned weight): "
                           "nothing to regroup")
    if br > n or bc > m:
        raise RegroupError(f"block {br}x{bc} is larger than {pattern.describe()}; use a "
                           "smaller --block")
    if edge == "error" and (n % br or m % bc):
        raise RegroupError(f"{pattern.describe()} is not divisible by block {br}x{bc}; use "
                           "edge='partial' (--edge partial) to allow short edge blocks")


def regroup_pattern(pattern: Pattern, *, block: Any = 32, format: str = "grid",
                    method: str = "auto", budget: Budget | str = "iso", seed: int = 0,
                    objective: str = "auto", edge: str = "partial",
                    time_limit: float | None = None,
                    params: dict[str, Any] | None = None,
                    refine: bool | None = None,
                    row_perm: Any = None, col_perm: Any = None) -> LayerResult:
    """Regroup one layer into a block layout.

    Parameters
    ----------
    pattern : Pattern
        The layer (see :func:`regroup.pattern.from_array`).
    block : int, (int, int) or str, default=32
        Block shape ``br x bc``; rows are output features.
    format : {"grid", "shuffled"}, default="grid"
    method : str, default="auto"
        Partitioner name, optionally with options: ``"metis:graph=jaccard"``.
    budget : Budget or str, default="iso"
        ``"iso"``, ``"density=D"``, ``"blocks=K"`` or ``"retained=R"``.
    seed : int, default=0
        Seed of every random choice; recorded in the result.
    objective : {"auto", "count", "magnitude"}, default="auto"
        What a kept block is worth: its nonzero count, or its ``sum |w|``. "auto" uses
        magnitudes when the pattern has weights.
    edge : {"partial", "error"}, default="partial"
        Whether shapes not divisible by the block get short edge blocks or raise.
    time_limit : float, optional
        Seconds per partitioner call; when set, partitioners run in a subprocess.
    params : dict, optional
        Partitioner options (override those in ``method``).
    refine : bool, optional
        Run the retained-mass local search (:mod:`regroup.refine`) on the chosen layout.
        Default: on for portfolio methods (``auto``), off for the others, so that single
        partitioners are measured as they are.
    row_perm, col_perm : array of int, optional
        Fixed orders (same convention as the result's): the rows, or the grid columns,
        are then not partitioned or refined, only the other side and the kept blocks are
        chosen. This is how a permutation shared with a neighbouring layer (folded into
        it) is respected. With ``row_perm`` given, ``method`` is not run for the rows and
        ``metrics["chosen"]`` is ``"fixed"``.

    Returns
    -------
    LayerResult

    Raises
    ------
    RegroupError
        Empty, fully dense or too small pattern; a partitioner failure (PartitionerError).
    ValueError, TypeError
        Invalid parameters.
    """
    caller = "regroup_pattern"
    if not isinstance(pattern, Pattern):
        raise TypeError(f"The 'pattern' parameter of {caller} must be a Pattern. Got "
                        f"{type(pattern).__name__} instead.")
    block = check_block(block, caller)
    check_choice(format, "format", caller, set(FORMATS))
    check_choice(objective, "objective", caller, set(OBJECTIVES))
    check_choice(edge, "edge", caller, set(EDGES))
    seed = check_int(seed, "seed", caller, low=0, high=2**63 - 1)
    budget = Budget.parse(budget)
    name, opts = parse_method(method, params)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"The 'time_limit' parameter of {caller} must be > 0. Got "
                         f"{time_limit!r} instead.")
    _validate_pattern(pattern, block, edge)
    n, m = pattern.n_rows, pattern.n_cols
    if row_perm is not None:
        row_perm = _fixed_perm(row_perm, n, "row_perm", caller)
    if col_perm is not None:
        if format != "grid":
            raise ValueError(f"The 'col_perm' parameter of {caller} applies to the grid "
                             f"format only (shuffled panels pick their own columns).")
        col_perm = _fixed_perm(col_perm, m, "col_perm", caller)
    t0 = time.perf_counter()

    B = pattern.binary()
    use_mag = objective == "magnitude" or (objective == "auto" and pattern.has_weights)
    if objective == "magnitude" and not pattern.has_weights:
        raise RegroupError(f"{pattern.describe()} has no weights; objective 'magnitude' needs "
                           "them (use objective 'count')")
    V = pattern.matrix if use_mag else B
    total = float(V.sum()) or 1.0   # all-zero magnitudes: every layout retains 0
    nnz = pattern.nnz
    spec = get_partitioner(name)
    wants_refine = bool(spec.portfolio)
    candidates = spec.portfolio if spec.portfolio else (format_method(name, opts),)
    if row_perm is not None:
        candidates, spec = ("fixed",), get_partitioner("identity")
    identity = build_layout(V, np.arange(n), np.arange(m), block, format, budget, nnz)
    scores: dict[str, float] = {}
    failed: dict[str, str] = {}
    best: tuple[float, str, Layout] | None = None
    for cand in candidates:
        cname, cparams = parse_method(cand) if spec.portfolio else (name, opts)
        try:
            if cname == "identity" and col_perm is None:
                lay = identity
            else:
                lay = _candidate(cname, cparams, B, V, format, block, budget, nnz, seed,
                                 time_limit, cluster_columns=not spec.portfolio,
                                 fixed_rows=row_perm, fixed_cols=col_perm)
        except PartitionerError as exc:
            if not spec.portfolio:
                raise PartitionerError(f"{pattern.describe()}: {exc}") from None
            failed[cand] = str(exc)
            warnings.warn(f"auto: candidate {cand!r} failed on {pattern.describe()}: {exc}",
                          RuntimeWarning, stacklevel=2)
            continue
        score = lay.kept_mass / total
        scores[cand] = score
        if best is None or score > best[0]:
            best = (score, cand, lay)
    assert best is not None  # identity never fails
    score, chosen, lay = best
    if spec.portfolio and format == "grid" and col_perm is None and get_partitioner(
            parse_method(chosen)[0]).columns == "home":
        # Candidates were scored with home-panel columns; the winner gets the full column
        # step, which makes it equal to a direct run of the chosen method.
        cols = group_columns(V, lay.row_perm, block, budget, nnz)
        lay = build_layout(V, lay.row_perm, cols, block, format, budget, nnz)
        score = lay.kept_mass / total
    do_refine = wants_refine if refine is None else bool(refine)
    refine_gain = None
    if do_refine:
        from .refine import refine as local_search
        lay = local_search(V, lay, budget, nnz, rows=row_perm is None, cols=col_perm is None)
        refine_gain = lay.kept_mass / total - score
    metrics = layer_metrics(pattern, lay, identity)
    metrics.update({"objective": "magnitude" if use_mag else "count", "budget": str(budget),
                    "chosen": chosen, "refined": do_refine, "refine_gain": refine_gain})
    if spec.portfolio:
        metrics["candidates"] = scores
        if failed:
            metrics["failed"] = failed
    return LayerResult(
        name=pattern.name, shape=pattern.shape, mask=pattern.unflatten(layout_mask(lay)),
        row_perm=lay.row_perm, col_perm=lay.col_perm, panel_cols=lay.panel_cols,
        block_shape=block, format=format, method=format_method(name, opts), params=opts,
        seed=seed, metrics=metrics, seconds=time.perf_counter() - t0)


@dataclass
class Run:
    """The outcome of :func:`regroup_file`: regrouped layers, skipped tensors, options."""

    source: dict[str, str]
    layers: list[LayerResult]
    skipped: list[tuple[str, str]]
    options: dict[str, Any]
    versions: dict[str, str | None] = field(default_factory=tool_versions)

    def meta(self) -> dict[str, Any]:
        return {"source": self.source, "options": self.options, "versions": self.versions,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}

    def save(self, path) -> None:
        """Write the result file (deterministic bytes; no wall-clock times)."""
        save_result(path, self.layers, self.meta())

    def report(self) -> dict[str, Any]:
        """The JSON report: per layer metrics including seconds, plus a summary."""
        rows = [report_row(_layer_meta(r, ""), r.seconds) for r in self.layers]
        return {**self.meta(), "layers": rows, "total": report_total(rows)}


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def select_layers(names: list[str], patterns: str | list[str] | None,
                  where: str | None = None) -> list[str]:
    """Names matching any of the glob ``patterns`` (all when None), in input order.

    With ``where`` (the file or model the names come from), a selection that matches
    nothing is a :class:`RegroupError` listing the names."""
    if patterns is None:
        return list(names)
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not out and where is not None:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise RegroupError(f"{where}: no layer matches {patterns!r}; layers are: {shown}")
    return out


def run_options(*, block: tuple[int, int], format: str, method: str, budget: Budget,
                seed: int, objective: str, edge: str, layers, time_limit, refine,
                budget_scope: str = "layer", layer_min: float = 0.0) -> dict[str, Any]:
    """The run options as recorded in result files and reports."""
    return {"block": list(block), "format": format, "method": method, "budget": str(budget),
            "seed": seed, "objective": objective, "edge": edge, "layers": layers,
            "time_limit": time_limit, "refine": refine, "budget_scope": budget_scope,
            "layer_min": layer_min}


def report_row(layer: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """One layer of the JSON report, from its result-file metadata (:func:`_layer_meta`)."""
    shape = list(layer["shape"])
    return {"name": layer["name"], "shape": shape,
            "matrix_shape": [shape[0], int(np.prod(shape[1:]))],
            "block": list(layer["block_shape"]), "format": layer["format"],
            "method": layer["method"], "params": layer["params"], "seed": layer["seed"],
            **layer["metrics"], "seconds": seconds}


def report_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's summary: nnz-weighted retained (and identity's), summed seconds."""
    nnz = sum(r["nnz"] for r in rows)
    return {"layers": len(rows), "nnz": nnz,
            "retained": sum(r["retained"] * r["nnz"] for r in rows) / nnz if nnz else None,
            "retained_identity": (sum(r["retained_identity"] * r["nnz"] for r in rows) / nnz
                                  if nnz else None),
            "seconds": sum(r["seconds"] or 0.0 for r in rows)}


def regroup_file(path, *, layers: str | list[str] | None = None, block: Any = 32,
                 format: str = "grid", method: str = "auto", budget: Budget | str = "iso",
                 seed: int = 0, objective: str = "auto", edge: str = "partial",
                 time_limit: float | None = None, params: dict[str, Any] | None = None,
                 refine: bool | None = None, budget_scope: str = "layer",
                 layer_min: float = 0.0,
                 progress: Callable[[str, int, int], None] | None = None) -> Run:
    """Regroup every selected layer of a mask or checkpoint file.

    Layers that cannot be regrouped (1-D, fully dense, empty, smaller than the block) are
    skipped and listed with the reason in ``Run.skipped``; a file without any usable layer
    raises :class:`RegroupError` naming the file and the reasons. Options are those of
    :func:`regroup_pattern`; ``layers`` is a glob (or list of globs) over layer names, and
    ``progress(name, index, total)`` is called before each layer is regrouped.

    ``budget_scope="global"`` reads ``budget`` model-wide: the layers are regrouped on their
    own, then one budget is spent across all of them where blocks retain the most
    (:func:`regroup.allocation.allocate_global`), reserving ``layer_min`` of each layer's
    own budget for it.
    """
    from .io import read_patterns

    block = check_block(block, "regroup_file")
    check_choice(budget_scope, "budget_scope", "regroup_file", {"layer", "global"})
    budget = Budget.parse(budget)
    name, opts = parse_method(method, params)
    patterns, skipped = read_patterns(path, layers=layers, block=block)
    source = {"name": os.path.basename(os.fspath(path)), "sha256": _sha256(path)}
    results = []
    for i, pat in enumerate(patterns):
        if progress is not None:
            progress(pat.name, i, len(patterns))
        try:
            results.append(regroup_pattern(
                pat, block=block, format=format, method=name, budget=budget, seed=seed,
                objective=objective, edge=edge, time_limit=time_limit, params=opts,
                refine=refine))
        except RegroupError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    if budget_scope == "global":
        from .allocation import allocate_global
        do_refine = bool(get_partitioner(name).portfolio) if refine is None else bool(refine)
        t0 = time.perf_counter()
        results = allocate_global(list(zip(patterns, results)), budget, layer_min=layer_min,
                                  refine=do_refine)
        share = (time.perf_counter() - t0) / max(len(results), 1)
        results = [replace(r, seconds=(r.seconds or 0.0) + share) for r in results]
    options = run_options(block=block, format=format, method=format_method(name, opts),
                          budget=budget, seed=seed, objective=objective, edge=edge,
                          layers=layers, time_limit=time_limit, refine=refine,
                          budget_scope=budget_scope, layer_min=layer_min)
    return Run(source=source, layers=results, skipped=skipped, options=options)
