"""Choosing a budget: retained against block density over a range of budgets.

:func:`sweep` regroups every usable layer of a file with each method (default ``auto``
and ``identity``) at each budget and reports, per layer and for the model, the block
density (kept block area / layer size), what the kept blocks retain (count, and
``|w|`` when weights are known) and, with torch, the CPU speed-up of the block-sparse
product at that density (:mod:`regroup.kernel_speed`). Every row is what ``regroup run
--method M --budget B`` gives for that layer (:func:`regroup.engine.regroup_budgets`:
the partitioners run once per layer and method, then each budget gets its own column
order, kept blocks and refinement).

Model rows aggregate by weights, as the layers add up in the model: sums of nnz, size,
kept blocks and area, retained counts and retained ``|w|`` (raw sums, as global
magnitude pruning compares weights) and of the timed seconds, so that the model's block
density is its kept area over its size and its speed-up the dense time of all its
layers over their block-sparse time.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .validation import RegroupError, check_distinct_list, check_int
from .blocks import parse_budgets
from .engine import regroup_budgets
from .kernel_speed import BATCH, speed_problem, time_layer, torch_versions
from .options import RegroupOptions, resolve_options
from .pattern import Pattern
from .pipeline import index_problem, usable_pattern
from .report import markdown_table
from .source import Source, open_source

__all__ = ["sweep", "Sweep", "DEFAULT_BUDGETS", "DEFAULT_METHODS", "LAYER_COLUMNS",
           "MODEL_COLUMNS", "CSV_COLUMNS"]

# Block densities from well below to well above the CPU break-even of a BSR product
# (about 0.25 at 4096^2, batch 256: FIELD_NOTES), and `regroup run`'s default budget
# (iso: kept area <= the layer's nnz) to place it among them.
DEFAULT_BUDGETS = ("density=0.05", "density=0.1", "density=0.2", "density=0.3",
                   "density=0.5", "iso")
DEFAULT_METHODS = ("auto", "identity")

LAYER_COLUMNS = ("layer", "rows", "cols", "nnz", "density", "method", "budget", "chosen",
                 "block_density", "retained", "retained_magnitude", "kept_blocks", "fill",
                 "dense_ms", "bsr_ms", "speedup", "seconds")
MODEL_COLUMNS = ("method", "budget", "layers", "nnz", "density", "block_density",
                 "retained", "retained_magnitude", "kept_blocks", "fill", "dense_ms",
                 "bsr_ms", "speedup", "seconds")
CSV_COLUMNS = ("scope", "layer", "layers", "rows", "cols", "nnz", "size", "density",
               "abs_weight", "method", "budget", "chosen", "block_density", "retained",
               "retained_magnitude", "kept_blocks", "kept_area", "fill", "dense_ms", "bsr_ms",
               "speedup", "seconds", "speed_note")

# progress(label, done, total, info), as regroup.pipeline's: called as each layer and
# method finishes all its budgets ("layer:method"), or a layer is skipped ("layer").
Progress = Callable[[str, int, int, dict], None]


@dataclass(frozen=True)
class Sweep:
    """The outcome of :func:`sweep`.

    Attributes
    ----------
    source : str
        The file swept (``"<patterns>"`` for patterns given directly).
    options : RegroupOptions
        The options of every run (``budget`` and ``method`` replaced per row).
    budgets, methods : tuple of str
        In the order of the rows.
    layers : list of dict
        Per layer, method and budget (in that nesting): ``layer``, ``rows``, ``cols``,
        ``nnz``, ``size`` (rows x cols), ``density`` (nnz / size), ``abs_weight`` (sum of
        ``|w|``, None without weights), ``method``, ``budget``, ``chosen`` (auto's
        winner), ``block_density`` (kept area / size), ``retained`` (share of nnz in kept
        blocks), ``retained_magnitude`` (share of ``|w|``, None without weights),
        ``kept_blocks``, ``kept_area``, ``fill`` (nnz inside / kept area), ``dense_ms``,
        ``bsr_ms``, ``speedup`` (dense / BSR; None when not measured, see ``speed``)
        and ``seconds`` (regrouping time; a layer's partitioners are timed in its first
        budget's row).
    model : list of dict
        Per method and budget, the same fields summed over the layers (``layers``: their
        count); shares are weighted by nnz (retained) and ``|w|`` (retained_magnitude,
        None unless every layer has weights), ``speedup`` is summed dense over summed BSR
        time (None unless every layer was timed).
    skipped : list of (name, reason)
    speed : dict
        ``measured`` (bool), ``note`` (why not, when not), ``batch``, ``format``,
        ``torch``, ``threads`` and ``seconds`` (time spent timing).
    seconds : float
        Wall-clock time of the whole sweep.
    """

    source: str
    options: RegroupOptions
    budgets: tuple[str, ...]
    methods: tuple[str, ...]
    layers: list[dict[str, Any]]
    model: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    speed: dict[str, Any]
    seconds: float

    @property
    def magnitude(self) -> bool:
        """Whether retained is read as ``|w|``: every layer has weights and the objective
        is not "count" (then the kept blocks maximised ``|w|``, and auto >= identity
        holds for it)."""
        return self.options.objective != "count" and bool(self.model) and all(
            r["retained_magnitude"] is not None for r in self.model)

    def best(self, min_speedup: float = 1.0) -> dict[str, dict[str, Any] | None]:
        """Per method, the model row that retains the most (``|w|`` when known) among
        those at least ``min_speedup`` times as fast as dense; None when there is none
        or the speed was not measured."""
        key = "retained_magnitude" if self.magnitude else "retained"
        out: dict[str, dict[str, Any] | None] = {}
        for method in self.methods:
            fast = [r for r in self.model if r["method"] == method
                    and r["speedup"] is not None and r["speedup"] >= min_speedup]
            out[method] = max(fast, key=lambda r: r[key]) if fast else None
        return out

    def summary(self, min_speedup: float = 1.0) -> str:
        """One line per method: the budget :meth:`best` picks, or why there is none."""
        if not self.speed.get("measured"):
            return (f"speed-up not measured: {self.speed.get('note')}; pick a budget by "
                    "retained alone")
        key = "retained_magnitude" if self.magnitude else "retained"
        what = "retained |w|" if self.magnitude else "retained"
        lines = []
        for method, r in self.best(min_speedup).items():
            lines.append(f"{method}: no budget is >= {min_speedup:g}x as fast as dense"
                         if r is None else
                         f"{method}: {r['budget']} retains the most at >= {min_speedup:g}x "
                         f"dense speed: block density {r['block_density']:.4f}, {what} "
                         f"{r[key]:.4f}, {r['speedup']:.2f}x")
        return "\n".join(lines)

    def csv_rows(self) -> list[dict[str, Any]]:
        """Model rows, then layer rows, with ``scope`` "model" / "layer" (:data:`CSV_COLUMNS`)."""
        note = self.speed.get("note")
        return ([{"scope": "model", "layer": "", **r, "speed_note": note} for r in self.model]
                + [{"scope": "layer", "layers": 1, **r, "speed_note": note}
                   for r in self.layers])

    def markdown(self) -> str:
        """The report: options, how speed was measured (or why not), model and layer tables."""
        o = self.options
        s = self.speed
        layout = ("no permutation gather (folded)" if s["format"] == "grid"
                  else "with the gather of every tile's input columns")
        speed = (f"CPU speed-up of torch's BSR product over dense `F.linear` (fp32, batch "
                 f"{s['batch']}, torch {s['torch']}, threads: {s['threads']}, best of "
                 f"rounds, {s['format']} layout {layout}; {s['seconds']:.1f} s of timing)"
                 if s.get("measured") else f"speed-up not measured: {s.get('note')}")
        lines = [f"# Budget sweep: {os.path.basename(self.source)}", "",
                 f"- source: `{self.source}`",
                 f"- {o.format} {o.block[0]}x{o.block[1]}, methods "
                 f"{', '.join(self.methods)}, budgets {', '.join(self.budgets)}, objective "
                 f"{o.objective}, seed {o.seed}",
                 f"- {speed}",
                 f"- {len({r['layer'] for r in self.layers})} layers, "
                 f"{len(self.skipped)} tensors skipped; {self.seconds:.1f} s", "",
                 "block_density: kept block area / size. retained: share of the nonzeros "
                 "inside kept blocks; retained_magnitude: share of |w|. speedup: dense time / "
                 "block-sparse time at this layer's shape and kept block count (> 1: "
                 "faster). seconds: regrouping time (a layer's partitioners run once per "
                 "method, in its first budget's row). Model rows: sums over the layers "
                 "(retained weighted by nnz, retained_magnitude by |w|).",
                 "", "## Model", "", markdown_table(self.model, MODEL_COLUMNS), "",
                 *("- " + line for line in self.summary().splitlines()), "",
                 "## Layers", "", markdown_table(self.layers, LAYER_COLUMNS)]
        if self.skipped:
            lines += ["", "## Skipped tensors", "",
                      markdown_table([{"layer": n, "reason": r} for n, r in self.skipped],
                                     ("layer", "reason"))]
        return "\n".join(lines) + "\n"


def _methods(methods: Any, opts: RegroupOptions, caller: str) -> tuple[str, ...]:
    allowed = "a non-empty list of distinct method specs, e.g. 'auto,identity'"
    return check_distinct_list(
        methods, "methods", caller, allowed,
        lambda m: resolve_options(opts, caller, method=m).method)


def _layers(source: Any, opts: RegroupOptions, caller: str):
    """``(where, total, items)``: items yield ``(name, shape, pattern or None, reason,
    early)`` for every selected tensor, one layer loaded at a time, selected and skipped
    as the pipeline does (``early``: skipped from the index alone, never loaded nor
    counted in ``total``)."""
    if isinstance(source, Pattern):
        source = [source]
    if isinstance(source, (list, tuple)) and all(isinstance(p, Pattern) for p in source) \
            and source:
        where = "<patterns>"
        keep = set(opts.select([p.name for p in source], where=where))
        pats = [p for p in source if p.name in keep]
        return where, len(pats), ((p.name, p.shape,
                                   *usable_pattern(p.name, p, None, where, opts), False)
                                  for p in pats)
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source)
    if not isinstance(source, Source):
        raise TypeError(f"The 'source' parameter of {caller} must be a path, a "
                        f"regroup.source.Source or a non-empty list of Patterns. Got "
                        f"{type(source).__name__} instead.")
    where = source.path
    refs = source.refs
    if opts.layers is not None:
        keep = set(opts.select([r.name for r in refs], where=where))
        refs = [r for r in refs if r.name in keep]

    def items():
        for ref in refs:
            problem = index_problem(ref, opts)
            if problem is not None:
                yield ref.name, ref.shape, None, problem, True
                continue
            weight, mask, _ = source.load(ref)
            yield (ref.name, ref.shape, *usable_pattern(ref.name, weight, mask, where, opts),
                   False)
    return where, sum(index_problem(r, opts) is None for r in refs), items()


def _row(pat: Pattern, abs_weight: float | None, method: str, r) -> dict[str, Any]:
    m = r.metrics
    size = pat.n_rows * pat.n_cols
    return {"layer": pat.name, "rows": pat.n_rows, "cols": pat.n_cols, "nnz": pat.nnz,
            "size": size, "density": pat.nnz / size, "abs_weight": abs_weight,
            "method": method, "budget": m["budget"], "chosen": m.get("chosen"),
            "block_density": m["kept_area"] / size, "retained": m["retained"],
            "retained_magnitude": m["retained_magnitude"], "kept_blocks": m["kept_blocks"],
            "kept_area": m["kept_area"], "fill": m["fill"], "dense_ms": None, "bsr_ms": None,
            "speedup": None, "seconds": r.seconds}


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One model row from the layer rows of one method and budget."""
    nnz = sum(r["nnz"] for r in rows)
    size = sum(r["size"] for r in rows)
    area = sum(r["kept_area"] for r in rows)
    kept_nnz = sum(r["retained"] * r["nnz"] for r in rows)
    weights = [r["abs_weight"] for r in rows]
    magnitude = None
    if all(w is not None and r["retained_magnitude"] is not None
           for w, r in zip(weights, rows)):
        total = sum(weights)
        magnitude = (sum(r["retained_magnitude"] * r["abs_weight"] for r in rows) / total
                     if total else 0.0)
    timed = all(r["dense_ms"] is not None for r in rows)
    dense = sum(r["dense_ms"] for r in rows) if timed else None
    bsr = sum(r["bsr_ms"] for r in rows) if timed else None
    return {"method": rows[0]["method"], "budget": rows[0]["budget"], "layers": len(rows),
            "nnz": nnz, "size": size, "density": nnz / size,
            "abs_weight": sum(weights) if magnitude is not None else None,
            "block_density": area / size, "retained": kept_nnz / nnz,
            "retained_magnitude": magnitude, "kept_blocks": sum(r["kept_blocks"] for r in rows),
            "kept_area": area, "fill": kept_nnz / area if area else 0.0,
            "dense_ms": dense, "bsr_ms": bsr,
            "speedup": dense / bsr if timed and bsr else None,
            "seconds": sum(r["seconds"] for r in rows)}


def sweep(source: Any, *, budgets: Any = DEFAULT_BUDGETS, methods: Any = DEFAULT_METHODS,
          options: RegroupOptions | None = None, speed: bool = True, batch: int = BATCH,
          threads: int | None = None, progress: Progress | None = None,
          **kwargs: Any) -> Sweep:
    """Retained against block density for each method over a range of budgets.

    Parameters
    ----------
    source : str, path-like, Source, Pattern or list of Pattern
        A file of any supported format or a sharded checkpoint
        (:func:`regroup.source.open_source`; one layer is loaded at a time), or patterns.
    budgets : str or sequence of (str or Budget), default=DEFAULT_BUDGETS
        ``"density=0.05,density=0.1,iso"`` or a list of the same
        (:func:`regroup.blocks.parse_budgets`). Density budgets give every layer the
        same block density (at most: blocks without a nonzero are never kept), hence
        one speed-up per shape; ``iso=F`` follows each layer's own density.
    methods : str or sequence of str, default=("auto", "identity")
        Method specs (``"auto,identity"``); identity is the "no regrouping" reference.
    options : RegroupOptions, optional
        Block, format, objective, seed, refine, layers, dense_above, ...; keyword
        arguments naming its fields are applied on top. Its ``budget`` and ``method``
        are replaced by each of ``budgets`` and ``methods``; ``budget_scope`` must be
        "layer".
    speed : bool, default=True
        Time the CPU BSR product at each row's shape and kept block count
        (:func:`regroup.kernel_speed.time_layer`; fp32, square blocks, torch imported
        here). When torch is not importable or the block is not square, the speed
        columns are None and ``Sweep.speed["note"]`` says why.
    batch : int, default=BATCH (256)
        Input rows of the timed products.
    threads : int, optional
        torch's thread count while timing (None: torch's default, all cores).
    progress : callable(label, done, total, info), optional
        Called as each layer and method finishes its budgets (``total``: layers x
        methods) and as a layer is skipped; ``info`` as in :mod:`regroup.pipeline`.

    Returns
    -------
    Sweep

    Raises
    ------
    RegroupError
        No usable layer (the reasons listed), a layer glob matching nothing, a failing
        layer (named with the file).
    ValueError, TypeError
        Invalid parameters.

    Notes
    -----
    Timing cost: one :func:`~regroup.kernel_speed.time_layer` call per layer with
    kept block counts not timed before at its shape, each about 1 s plus three
    rounds of every product; layers sharing a shape and a count reuse the first timing.
    """
    caller = "sweep"
    opts = resolve_options(options, caller, **kwargs)
    opts.refuse_chain(caller)
    if opts.budget_scope != "layer":
        raise ValueError(f"The 'budget_scope' parameter of {caller} must be 'layer': a "
                         "sweep scores every layer under its own budget. Got "
                         f"{opts.budget_scope!r} instead.")
    opts.require_blocks(caller, "a sweep varies the block budget, and N:M keeps N/M of "
                        "every row (compare N:M methods with `regroup compare --format nm`)")
    parsed = parse_budgets(budgets, "budgets", caller)
    names = tuple(str(b) for b in parsed)
    methods = _methods(methods, opts, caller)
    if not isinstance(speed, bool):
        raise TypeError(f"The 'speed' parameter of {caller} must be a bool. Got "
                        f"{speed!r} instead.")
    batch = check_int(batch, "batch", caller, low=1, high=1 << 20)
    if threads is not None:
        threads = check_int(threads, "threads", caller, low=1, high=4096)
    t0 = time.perf_counter()
    note = speed_problem(opts.block) if speed else "not requested (speed=False or --no-speed)"
    measure = note is None
    speed_info = {"measured": measure, "note": note, "batch": batch, "format": opts.format,
                  **torch_versions(threads), "seconds": 0.0}
    where, total, items = _layers(source, opts, caller)
    runs = [dataclasses.replace(opts, method=m).per_layer() for m in methods]
    timings: dict[tuple, tuple[float, float]] = {}
    layers: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    done = 0
    for name, shape, pat, reason, early in items:
        if pat is None:
            skipped.append((name, reason))
            if not early:
                done += len(methods)
                if progress is not None:
                    progress(name, done, total * len(methods),
                             {"status": "skipped", "shape": shape, "seconds": None,
                              "retained": None, "reason": reason, "cached": False})
            continue
        abs_weight = float(pat.matrix.sum()) if pat.has_weights else None
        rows = []
        for method, run in zip(methods, runs):
            try:
                results = regroup_budgets(pat, parsed, options=run)
            except RegroupError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            rows += [_row(pat, abs_weight, method, r) for r in results]
            done += 1
            if progress is not None:
                progress(f"{name}:{method}", done, total * len(methods),
                         {"status": "done", "shape": tuple(pat.shape),
                          "seconds": sum(r.seconds for r in results), "retained": None,
                          "reason": None, "cached": False})
        if measure:
            ts = time.perf_counter()
            key = (pat.n_rows, pat.n_cols)
            need = sorted({r["kept_blocks"] for r in rows} - {k for s, k in timings
                                                               if s == key})
            if need:
                t = time_layer(key, opts.block, need, format=opts.format, batch=batch,
                               seed=opts.seed, threads=threads)
                timings.update({(key, k): (t.dense, t.bsr[k]) for k in need})
            for r in rows:
                dense, bsr = timings[(key, r["kept_blocks"])]
                r.update(dense_ms=1e3 * dense, bsr_ms=1e3 * bsr,
                         speedup=dense / bsr if bsr > 0 else None)
            speed_info["seconds"] += time.perf_counter() - ts
        layers += rows
    if not layers:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "it holds no tensor"
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        raise RegroupError(f"{where}: no usable layer: {why}{more}")
    model = [_total([r for r in layers if r["method"] == m and r["budget"] == b])
             for m in methods for b in names]
    return Sweep(source=where, options=opts, budgets=names, methods=methods, layers=layers,
                 model=model, skipped=skipped, speed=speed_info,
                 seconds=time.perf_counter() - t0)
