"""The regrouping engine: one layer's pattern in, a scored block layout out.

:func:`regroup_pattern` runs the chosen partitioner (or every member of a portfolio such
as ``auto``), orders the grid columns, keeps the best blocks under the budget and, where
asked, refines the layout; :func:`regroup_budgets` does the same at several budgets,
running each partitioner once. Files and checkpoints go through :mod:`regroup.pipeline`.
``regroup_pattern(init=...)`` warm-starts from a previous layout instead (a re-layout
during sparse training, :mod:`regroup.dst`): bounded refinement, no partitioner.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from .validation import PartitionerError, RegroupError, check_int
from .anneal import anneal
from .blocks import (MAX_TABLE_CELLS, Budget, Layout, build_layout, check_layout,
                     layout_mask, parse_budgets, summing_form, table_cells)
from .columns import PROFILE_CLUSTER_LIMIT, clustered_columns, group_columns
from .metrics import layer_metrics, nm_metrics
from .nm import (NM_METHODS, efficacy, nm_mask, nm_problem, nm_retained, row_topk_retained,
                 run_nm_method)
from .options import DENSE_ABOVE, RegroupOptions, resolve_options
from .partitioners import (check_perm, format_method, get_partitioner, parse_method,
                          run_partitioner)
from .pattern import Pattern
from .refine import refine as local_search, warm_start
from .result import LayerResult

__all__ = ["regroup_pattern", "regroup_budgets", "objective_matrix", "WARM_ROUNDS"]

# Rounds of refinement of a warm start (regroup_pattern(init=...)): a re-layout during
# training starts near a local optimum, so a few rounds take most of what there is.
WARM_ROUNDS = 3


def _orders(name: str, params: dict, B: sp.csr_matrix, fmt: str, block: tuple[int, int],
            seed: int, time_limit: float | None, own_cols: bool,
            memo: dict[str, tuple] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The partitioner's row order and, with ``own_cols`` (a partitioner that orders the
    grid columns itself), its column order: what does not depend on the budget.

    ``memo`` (one per pattern and options but the budget, as :func:`regroup_budgets`
    keeps it) holds them by method spec, with the warnings the partitioner gave (replayed)
    or its failure (raised again), so a pattern regrouped at several budgets runs each
    partitioner once and gets what independent runs would."""
    key = format_method(name, params) + (":own_cols" if own_cols else "")
    if memo is None or key not in memo:
        # A fresh generator per candidate: auto's winner equals a direct run of that method.
        rng = np.random.default_rng(seed)
        rows = cols = error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rows = run_partitioner(name, params, B, block[0], rng, time_limit)
                if own_cols:
                    cols = run_partitioner(name, params, B.T.tocsr(), block[1], rng,
                                           time_limit)
            except PartitionerError as exc:
                if memo is None:
                    _replay(caught)
                    raise
                error = exc
        entry = (rows, cols, error, list(caught))
        if memo is not None:
            memo[key] = entry
    else:
        entry = memo[key]
    rows, cols, error, caught = entry
    _replay(caught)
    if error is not None:
        raise PartitionerError(str(error))
    return rows, cols


def _replay(caught: list) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _candidate(name: str, params: dict, B: sp.csr_matrix, V: sp.csr_matrix, fmt: str,
               block: tuple[int, int], budget: Budget, nnz: int, seed: int,
               time_limit: float | None, cluster_columns: bool = True,
               fixed_rows: np.ndarray | None = None,
               fixed_cols: np.ndarray | None = None,
               memo: dict[str, tuple] | None = None) -> Layout:
    own_cols = (fmt == "grid" and fixed_cols is None and fixed_rows is None
                and get_partitioner(name).columns == "self")
    if fixed_rows is not None:
        row_perm, col_perm = fixed_rows, None
    else:
        row_perm, col_perm = _orders(name, params, B, fmt, block, seed, time_limit,
                                     own_cols, memo)
    if fmt == "grid" and fixed_cols is not None:
        col_perm = fixed_cols
    elif fmt == "grid" and col_perm is None:
        col_perm = group_columns(V, row_perm, block, budget, nnz, cluster=cluster_columns)
    return build_layout(V, row_perm, col_perm, block, fmt, budget, nnz)


def _fixed_perm(perm: Any, n: int, what: str, caller: str) -> np.ndarray:
    try:
        return check_perm(perm, n, f"the {what!r} parameter of {caller}")
    except PartitionerError as exc:
        raise ValueError(str(exc).replace(" returned ", " is ")) from None



def _validate_pattern(pattern: Pattern, block: tuple[int, int], edge: str,
                      nm: tuple[int, int] | None = None, fmt: str = "grid",
                      dense_ok: bool = False) -> None:
    n, m = pattern.n_rows, pattern.n_cols
    br, bc = block
    if pattern.nnz == 0:
        raise RegroupError(f"{pattern.describe()} is empty (no nonzero): nothing to regroup")
    # (N:M prunes dense weights; a warm start re-lays a layout out on dense scores; the
    # magnitude objective groups a dense weight's |w|)
    if pattern.nnz == n * m and nm is None and not dense_ok:
        hint = " (objective='magnitude' groups its |w|)" if pattern.has_weights else ""
        raise RegroupError(f"{pattern.describe()} is fully dense (no pruned weight): "
                           f"nothing to regroup{hint}")
    problem = None if nm is None else nm_problem(n, m, nm)
    if problem:     # N:M groups are never padded (the pipeline skips such layers)
        raise RegroupError(f"{pattern.describe()}: {problem}")
    if br > n or bc > m:
        raise RegroupError(f"block {br}x{bc} is larger than {pattern.describe()}; use a "
                           "smaller --block")
    cells = None if nm is not None else table_cells((n, m), block, fmt)
    if cells is not None and cells > MAX_TABLE_CELLS:
        raise RegroupError(f"{pattern.describe()} at block {br}x{bc} ({fmt}) makes "
                           f"{cells} candidate blocks, above the limit of {MAX_TABLE_CELLS} "
                           "(regroup.blocks.MAX_TABLE_CELLS); use a larger --block")
    if edge == "error" and (n % br or m % bc):
        raise RegroupError(f"{pattern.describe()} is not divisible by block {br}x{bc}; use "
                           "edge='partial' (--edge partial) to allow short edge blocks")



def regroup_pattern(pattern: Pattern, *, options: RegroupOptions | None = None,
                    row_perm: Any = None, col_perm: Any = None,
                    init: LayerResult | None = None, warm_rounds: int | None = None,
                    **kwargs: Any) -> LayerResult:
    """Regroup one layer into a block layout.

    Parameters
    ----------
    pattern : Pattern
        The layer (see :func:`regroup.pattern.from_array`).
    options : RegroupOptions, optional
        Block, format, method, budget, seed, objective, edge, refine and time limit (see
        :class:`regroup.RegroupOptions`). The fields that select and budget whole files
        and models (``layers``, ``budget_scope="global"``) are refused here: pass
        ``options.per_layer()``.
    row_perm, col_perm : array of int, optional
        Fixed orders (same convention as the result's): the rows, or the grid columns,
        are then not partitioned or refined, only the other side and the kept blocks are
        chosen. This is how a permutation shared with a neighbouring layer (folded into
        it) is respected. With ``row_perm`` given, the method is not run for the rows and
        ``metrics["chosen"]`` is ``"fixed"`` (``"warm"`` with ``init``). Format "nm"
        takes ``col_perm`` only: no search is run, the N:M mask of those columns is taken
        (``chosen`` "fixed").
    init : LayerResult, optional
        Warm start (grid and shuffled): no partitioner runs. The start is ``init``'s
        orders (``row_perm``, and ``col_perm`` for grid) with the kept blocks re-picked
        for this pattern under the budget (for shuffled, each panel's tiles are re-picked
        from the panel's column masses); then at most ``warm_rounds`` rounds of
        refinement (:func:`regroup.refine.refine`; none when the options do not refine:
        ``refine=False``, or ``None`` with a single method) and, with ``anneal``, the
        annealing and refinement that follow it in the cold path. The
        result never keeps less mass than that start. The start is ``init``'s own layout
        when ``init`` was made for this pattern with these options; when the blocks have
        equal area (shape divisible by the block) and ``init``'s blocks fit the budget,
        it keeps at least their mass on this pattern. ``init`` must match the options'
        format and block and the pattern's matrix shape, with orders that are
        permutations and a mask that is the union of its blocks. The pattern may be
        fully dense (scores of every position).
        With ``row_perm`` (``col_perm``) the start takes that order for the rows (grid
        columns) instead of ``init``'s, and the refinement leaves it in place.
        ``metrics["chosen"]`` is ``"warm"`` and ``metrics["warm_start"]`` holds
        ``{"rounds": max rounds, "start": the start's retained share of the objective,
        "fixed": the sides given}``.
    warm_rounds : int, optional
        Refinement rounds of a warm start (default :data:`WARM_ROUNDS`); ``init`` only.
    **kwargs
        Fields of :class:`regroup.RegroupOptions`, applied on top of ``options``.

    Returns
    -------
    LayerResult

    Raises
    ------
    RegroupError
        Empty, fully dense (unless ``init`` is given) or too small pattern; a
        partitioner failure (PartitionerError).
    ValueError, TypeError
        Invalid parameters.
    """
    caller = "regroup_pattern"
    opts = _layer_options(pattern, options, caller, kwargs, dense_ok=init is not None)
    n, m = pattern.n_rows, pattern.n_cols
    if row_perm is not None:
        if opts.format == "nm":
            raise ValueError(f"The 'row_perm' parameter of {caller} applies to the grid "
                             "and shuffled formats only (N:M keeps rows in place).")
        row_perm = _fixed_perm(row_perm, n, "row_perm", caller)
    if col_perm is not None:
        if opts.format == "shuffled":
            raise ValueError(f"The 'col_perm' parameter of {caller} applies to the grid "
                             "format only, and to nm (shuffled panels pick their own "
                             "columns).")
        col_perm = _fixed_perm(col_perm, m, "col_perm", caller)
    if init is not None or warm_rounds is not None:
        return _regroup_warm(pattern, opts, init, warm_rounds, row_perm, col_perm, caller)
    if opts.format == "nm":
        return _regroup_nm(pattern, opts, col_perm)
    return _regroup(pattern, opts, row_perm, col_perm, caller, None)


def regroup_budgets(pattern: Pattern, budgets: Any, *, options: RegroupOptions | None = None,
                    **kwargs: Any) -> list[LayerResult]:
    """Regroup one layer at several budgets; each partitioner runs once.

    The result at each budget is what :func:`regroup_pattern` gives with that budget
    (the same layout and metrics; ``seconds`` differ: the partitioners' time falls on the
    first budget). What depends on the budget - grid column order, kept blocks,
    refinement, annealing - is done per budget; the partitioners' row orders are not and
    are shared. A partitioner that is not deterministic (``spec.deterministic`` False)
    gives every budget the same order, where independent runs could differ.

    Parameters
    ----------
    pattern : Pattern
    budgets : str or sequence of (str or Budget)
        Budgets, in the order of the results: ``["density=0.1", "iso"]`` or the same as
        one comma-separated str (:func:`regroup.blocks.parse_budgets`).
    options : RegroupOptions, optional
        As :func:`regroup_pattern`; its ``budget`` is replaced by each of ``budgets``.
    **kwargs
        Fields of :class:`regroup.RegroupOptions`, applied on top of ``options``.

    Returns
    -------
    list of LayerResult
        One per budget, in order.

    Raises
    ------
    RegroupError, ValueError, TypeError
        As :func:`regroup_pattern`; an empty, repeated or invalid budget.
    """
    caller = "regroup_budgets"
    opts = _layer_options(pattern, options, caller, kwargs)
    opts.require_blocks(caller, "N:M keeps N/M of every row whatever the budget")
    memo: dict[str, tuple] = {}
    return [_regroup(pattern, dataclasses.replace(opts, budget=b), None, None, caller, memo)
            for b in parse_budgets(budgets, "budgets", caller)]


def _layer_options(pattern: Pattern, options: RegroupOptions | None, caller: str,
                   kwargs: dict[str, Any], dense_ok: bool = False) -> RegroupOptions:
    """The validated options of a one-layer call, and the pattern checked against them."""
    opts = resolve_options(options, caller, **kwargs)
    opts.refuse_chain(caller)
    if opts.layers is not None or opts.budget_scope != "layer" or \
            opts.dense_above != DENSE_ABOVE:
        raise ValueError(f"{caller} regroups one layer: 'layers', 'dense_above' and "
                         "budget_scope='global' select and budget whole files and models "
                         "(regroup_file, regroup_checkpoint, regroup_model); pass "
                         "options.per_layer() here")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"The 'pattern' parameter of {caller} must be a Pattern. Got "
                        f"{type(pattern).__name__} instead.")
    dense_ok = dense_ok or (opts.objective == "magnitude" and pattern.has_weights)
    _validate_pattern(pattern, opts.block, opts.edge, opts.nm, opts.format, dense_ok)
    return opts


def objective_matrix(pattern: Pattern, opts: RegroupOptions,
                     B: sp.csr_matrix | None = None) -> tuple[sp.csr_matrix, bool]:
    """The matrix whose mass a layout (or an N:M mask) keeps under ``opts.objective``:
    the magnitudes, or the 0/1 pattern (``B`` when given); and whether it is the
    magnitudes. RegroupError when "magnitude" is asked of a pattern without weights."""
    objective = opts.objective
    use_mag = objective == "magnitude" or (objective == "auto" and pattern.has_weights)
    if objective == "magnitude" and not pattern.has_weights:
        raise RegroupError(f"{pattern.describe()} has no weights; objective 'magnitude' needs "
                           "them (use objective 'count')")
    if use_mag:
        return pattern.matrix, True
    return (pattern.binary() if B is None else B), False


def _check_init(init: Any, pattern: Pattern, opts: RegroupOptions, caller: str
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``init``'s row order and (grid) column order, once it is found to be a valid
    layout of this pattern's shape under the options' format and block."""
    if not isinstance(init, LayerResult):
        raise TypeError(f"The 'init' parameter of {caller} must be a LayerResult. Got "
                        f"{type(init).__name__} instead.")
    n, m = pattern.n_rows, pattern.n_cols
    if init.format != opts.format:
        raise ValueError(f"The 'init' parameter of {caller} must be a layout of the options' "
                         f"format {opts.format!r}. Got format {init.format!r} instead.")
    if tuple(init.block_shape) != tuple(opts.block):
        raise ValueError(f"The 'init' parameter of {caller} must have the options' block "
                         f"{tuple(opts.block)}. Got block {tuple(init.block_shape)} instead.")
    shape2d = (init.shape[0], int(np.prod(init.shape[1:]))) if len(init.shape) >= 2 else None
    if shape2d != (n, m) or np.shape(init.mask) != tuple(init.shape):
        raise ValueError(f"The 'init' parameter of {caller} must be a layout of a {n}x{m} "
                         f"matrix ({pattern.describe()}). Got shape {tuple(init.shape)} "
                         f"(mask {np.shape(init.mask)}) instead.")
    rows = _fixed_perm(init.row_perm, n, "init.row_perm", caller)
    cols = (_fixed_perm(init.col_perm, m, "init.col_perm", caller)
            if opts.format == "grid" else None)
    try:
        check_layout(np.asarray(init.mask2d, dtype=bool), opts.format, opts.block, rows,
                     cols, init.panel_cols)
    except (RegroupError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"The 'init' parameter of {caller} must be a valid "
                         f"{opts.format} layout (its mask the union of its blocks). Got one "
                         f"that is not: {exc}") from None
    return rows, cols


def _regroup_warm(pattern: Pattern, opts: RegroupOptions, init: Any, rounds: Any,
                  row_perm: Any, col_perm: Any, caller: str) -> LayerResult:
    """:func:`regroup_pattern` started from ``init``'s layout: bounded refinement in
    place of the partitioners."""
    if init is None:
        raise ValueError(f"The 'warm_rounds' parameter of {caller} applies to a warm start "
                         "only. Got a value without 'init' instead.")
    if opts.format == "nm":
        raise ValueError(f"The 'init' parameter of {caller} applies to the grid and "
                         "shuffled formats only. Got format 'nm' instead.")
    if opts.anneal is not None and row_perm is not None:
        raise ValueError(f"The 'anneal' parameter of {caller} moves rows, which row_perm "
                         "fixes (a folded dimension); leave anneal unset for such layers")
    rounds = WARM_ROUNDS if rounds is None else check_int(rounds, "warm_rounds", caller,
                                                          low=1, high=1000)
    if not opts.refines:
        rounds = 0
    t0 = time.perf_counter()
    rows, cols = _check_init(init, pattern, opts, caller)
    # A fixed side (folded into a neighbour) starts from the given order and stays.
    rows = rows if row_perm is None else row_perm
    cols = cols if col_perm is None else col_perm
    block, format, budget = opts.block, opts.format, opts.budget
    V, use_mag = objective_matrix(pattern, opts)
    total = float(V.sum()) or 1.0
    nnz = pattern.nnz
    S = summing_form(V)
    notes: list[str] = []
    free_rows, free_cols = row_perm is None, col_perm is None
    if not (free_rows or (free_cols and format == "grid")):
        rounds = 0                       # every order fixed: the blocks only
    start, lay = warm_start(S, rows, cols, block, format, budget, nnz, rounds=rounds,
                            rows=free_rows, cols=free_cols, time_limit=opts.time_limit,
                            notes=notes)
    anneal_gain = None
    if opts.anneal is not None:           # as in the cold path, after the refinement
        before = lay.kept_mass
        lay = anneal(V, lay, budget, nnz, seconds=opts.anneal, seed=opts.seed)
        if lay.kept_mass > before and rounds:
            lay = local_search(S, lay, budget, nnz, max_rounds=rounds, cols=free_cols,
                               time_limit=opts.time_limit, notes=notes)
        anneal_gain = (lay.kept_mass - before) / total
    identity = build_layout(S, np.arange(pattern.n_rows), np.arange(pattern.n_cols), block,
                            format, budget, nnz)
    metrics = layer_metrics(pattern, lay, identity,
                            values=S if use_mag and isinstance(S, np.ndarray) else None)
    metrics.update({"objective": "magnitude" if use_mag else "count", "budget": str(budget),
                    "chosen": "warm", "refined": rounds > 0,
                    "refine_gain": (lay.kept_mass - start.kept_mass) / total if rounds
                    else None,
                    "warm_start": {"rounds": rounds, "start": start.kept_mass / total,
                                   "fixed": [side for side, perm in (("rows", row_perm),
                                                                     ("cols", col_perm))
                                             if perm is not None]}})
    if opts.anneal is not None:
        metrics["anneal_gain"] = anneal_gain
    if notes:
        metrics["bounds"] = notes
    return LayerResult(
        name=pattern.name, shape=pattern.shape, mask=pattern.unflatten(layout_mask(lay)),
        row_perm=lay.row_perm, col_perm=lay.col_perm, panel_cols=lay.panel_cols,
        block_shape=block, format=format, method=opts.method,
        params=opts.partitioner[1], seed=opts.seed, metrics=metrics,
        seconds=time.perf_counter() - t0)


def _regroup(pattern: Pattern, opts: RegroupOptions, row_perm: np.ndarray | None,
             col_perm: np.ndarray | None, caller: str, memo: dict[str, tuple] | None
             ) -> LayerResult:
    """:func:`regroup_pattern` on validated arguments; ``memo`` as in :func:`_orders`."""
    block, format, budget, seed = opts.block, opts.format, opts.budget, opts.seed
    name, params = opts.partitioner
    n, m = pattern.n_rows, pattern.n_cols
    t0 = time.perf_counter()

    B = pattern.binary()
    V, use_mag = objective_matrix(pattern, opts, B)
    total = float(V.sum()) or 1.0   # all-zero magnitudes: every layout retains 0
    nnz = pattern.nnz
    spec = get_partitioner(name)
    candidates = spec.portfolio if spec.portfolio else (opts.method,)
    if row_perm is not None:
        candidates, spec = ("fixed",), get_partitioner("identity")
    identity = build_layout(V, np.arange(n), np.arange(m), block, format, budget, nnz)
    scores: dict[str, float] = {}
    failed: dict[str, str] = {}
    scored: list[tuple[float, str, Layout]] = []
    said: dict[str, list[str]] = {}
    for cand in candidates:
        cname, cparams = parse_method(cand) if spec.portfolio else (name, params)
        try:
            if cname == "identity" and row_perm is None and col_perm is None:
                lay = identity
            else:
                # What a partitioner warns about (a baseline degenerating) goes into the
                # layer's metrics too, so that it reaches reports from worker processes.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        lay = _candidate(cname, cparams, B, V, format, block, budget, nnz,
                                         seed, opts.time_limit,
                                         # With refinement after it, the profile
                                         # clustering of every candidate's columns
                                         # bought nothing on DLMC for a third of the
                                         # time (benchmarks/README.md); auto tries it
                                         # on its winner only (below).
                                         cluster_columns=not (spec.portfolio
                                                              or opts.refines),
                                         fixed_rows=row_perm, fixed_cols=col_perm,
                                         memo=memo)
                    finally:
                        for w in caught:
                            said.setdefault(cand, []).append(str(w.message))
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except PartitionerError as exc:
            if not spec.portfolio:
                raise PartitionerError(f"{pattern.describe()}: {exc}") from None
            failed[cand] = str(exc)
            warnings.warn(f"auto: candidate {cand!r} failed on {pattern.describe()}: {exc}",
                          RuntimeWarning, stacklevel=2)
            continue
        scores[cand] = lay.kept_mass / total
        scored.append((scores[cand], cand, lay))
    if not scored:   # identity is a member of every portfolio and cannot fail
        raise RegroupError(f"{pattern.describe()}: every candidate of {opts.method!r} failed")
    do_refine = opts.refines
    # Why a size bound left part of the search out (regroup.refine.step_bounds): recorded
    # in metrics["bounds"], never silent.
    notes: list[str] = []

    def finish(cand: str, lay: Layout) -> tuple[float, Layout]:
        """A candidate as a direct run of its method leaves it: full column step (grid;
        auto scored its candidates with home-panel columns), then refinement. Returns the
        score before refinement too (what refine_gain is measured from)."""
        if spec.portfolio and not do_refine and format == "grid" and col_perm is None and \
                get_partitioner(parse_method(cand)[0]).columns == "home":
            cols = group_columns(V, lay.row_perm, block, budget, nnz)
            lay = build_layout(V, lay.row_perm, cols, block, format, budget, nnz)
        start = lay.kept_mass / total
        if do_refine:
            # (every candidate's blocks are build_layout's choice for its orders)
            lay = local_search(V, lay, budget, nnz, rows=row_perm is None,
                               cols=col_perm is None, time_limit=opts.time_limit,
                               notes=notes, chosen=True)
        return start, lay

    refined: dict[str, float] = {}
    polish_gain = None
    if spec.portfolio and do_refine:
        # Refinement can reorder the candidates (a lower start may climb higher: on DLMC
        # the best refined candidate was not among the best 3 starts on 18 of 214 runs),
        # so every candidate is finished and the best finished layout wins; candidates
        # that start from the same rows (and columns) finish alike and are finished once.
        best = None
        done: dict[bytes, tuple[float, Layout]] = {}
        ranked = sorted(scored, key=lambda t: -t[0])      # stable: portfolio order on ties
        for _, cand, lay in ranked:
            key = lay.row_perm.tobytes() + (b"" if lay.col_perm is None
                                            else lay.col_perm.tobytes())
            if key not in done:
                done[key] = finish(cand, lay)
            start, fin = done[key]
            refined[cand] = fin.kept_mass / total
            if best is None or refined[cand] > best[0]:
                best = (refined[cand], cand, fin, start)
        _, chosen, lay, start = best
        if format == "grid" and col_perm is None and block[1] < m <= PROFILE_CLUSTER_LIMIT:
            # The candidates' columns started from home panels. On average that is as good
            # after refinement, but the profile clustering finds planted column groups
            # that refinement from home panels can miss, so the winner's columns are also
            # refined from it.
            cols = clustered_columns(V, lay.row_perm, block[0], block[1])
            alt = local_search(V, build_layout(V, lay.row_perm, cols, block, format, budget,
                                               nnz), budget, nnz, rows=row_perm is None,
                               time_limit=opts.time_limit, notes=notes, chosen=True)
            polish_gain = max(alt.kept_mass - lay.kept_mass, 0.0) / total
            if alt.kept_mass > lay.kept_mass:
                lay = alt
        refine_gain = lay.kept_mass / total - start
    else:
        _, chosen, lay = max(scored, key=lambda t: t[0])  # first of equals
        if spec.portfolio or do_refine:
            start, lay = finish(chosen, lay)
        refine_gain = lay.kept_mass / total - start if do_refine else None
    anneal_gain = None
    if opts.anneal is not None and row_perm is not None:
        raise ValueError(f"The 'anneal' parameter of {caller} moves rows, which row_perm "
                         "fixes (a folded dimension); leave anneal unset for such layers")
    if opts.anneal is not None:
        before = lay.kept_mass
        # anneal() returns its start unless it found a layout keeping more.
        lay = anneal(V, lay, budget, nnz, seconds=opts.anneal, seed=seed)
        if lay.kept_mass > before and do_refine:
            # Annealing moved the rows; refinement re-fits the columns and tiles to them.
            lay = local_search(V, lay, budget, nnz, cols=col_perm is None,
                               time_limit=opts.time_limit, notes=notes)
        anneal_gain = (lay.kept_mass - before) / total
    metrics = layer_metrics(pattern, lay, identity)
    metrics.update({"objective": "magnitude" if use_mag else "count", "budget": str(budget),
                    "chosen": chosen, "refined": do_refine, "refine_gain": refine_gain})
    if opts.anneal is not None:
        metrics["anneal_gain"] = anneal_gain
    if said:
        metrics["warnings"] = said
    if notes:
        metrics["bounds"] = notes
    if spec.portfolio:
        metrics["candidates"] = scores
        if refined:
            metrics["candidates_refined"] = refined
        if polish_gain is not None:
            metrics["columns_polish_gain"] = polish_gain
        if failed:
            metrics["failed"] = failed
    return LayerResult(
        name=pattern.name, shape=pattern.shape, mask=pattern.unflatten(layout_mask(lay)),
        row_perm=lay.row_perm, col_perm=lay.col_perm, panel_cols=lay.panel_cols,
        block_shape=block, format=format, method=opts.method, params=params,
        seed=seed, metrics=metrics, seconds=time.perf_counter() - t0)


def _regroup_nm(pattern: Pattern, opts: RegroupOptions, col_perm: np.ndarray | None
                ) -> LayerResult:
    """:func:`regroup_pattern` for format "nm": the N:M search ``opts.method`` on the
    scores (``|w|``, or the 0/1 pattern under the count objective), deterministic for the
    seed (unless ``time_limit`` cuts it short), then the N:M mask of the permuted columns
    in original coordinates."""
    t0 = time.perf_counter()
    nm = opts.nm
    V, use_mag = objective_matrix(pattern, opts)
    A = V.toarray()
    if col_perm is None:
        found = run_nm_method(opts.method, A, nm, seed=opts.seed, time_limit=opts.time_limit)
        perm, kept, plain = found.col_perm.astype(np.intp), found.retained, found.plain
        chosen, search = NM_METHODS[opts.method].__name__, found.stats
    else:
        perm, kept, plain = col_perm, nm_retained(A, nm, col_perm), nm_retained(A, nm)
        chosen, search = "fixed", None
    mask2d = nm_mask(A, nm, perm)
    metrics = nm_metrics(pattern, mask2d, nm_mask(A, nm))
    gap_closed = efficacy(kept, plain, row_topk_retained(A, nm))
    metrics.update({"objective": "magnitude" if use_mag else "count", "chosen": chosen,
                    # NaN (no gap to close) is not JSON: None
                    "efficacy": None if np.isnan(gap_closed) else gap_closed})
    if search is not None:
        metrics["search"] = search
    return LayerResult(
        name=pattern.name, shape=pattern.shape, mask=pattern.unflatten(mask2d),
        row_perm=np.arange(pattern.n_rows, dtype=np.intp), col_perm=perm, panel_cols=None,
        block_shape=opts.block, format="nm", method=opts.method, params={}, seed=opts.seed,
        metrics=metrics, seconds=time.perf_counter() - t0, nm=nm)
