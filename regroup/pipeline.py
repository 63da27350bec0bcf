"""One pipeline for files and checkpoints.

Source -> :func:`regroup.regroup_pattern` per layer -> sink -> optional model-wide budget
-> :class:`Run`:

- the source (:func:`regroup.source.open_source`) is indexed once and every layer is
  loaded on its own, so one layer at a time is in memory per worker;
- layers run in this process, in ``jobs`` worker processes, or on dask
  (:mod:`regroup.executors`); each depends only on its input and the seed;
- the sink is memory (:func:`regroup_file`: the Run holds the LayerResults) or a parts
  directory (:func:`regroup_checkpoint`: each finished layer is written at once to
  ``OUT.parts/<i>.npz`` with the SHA-256 of its input tensors and the options; a rerun
  skips layers whose part matches, so an interrupted run resumes; the result file is
  assembled entry by entry, atomically, and the parts are removed);
- ``budget_scope="global"`` adds a second pass: every layer's candidate blocks (a few
  numbers per block) are gathered, one model-wide budget is spent over them
  (:func:`regroup.allocation.allot`), and each layer is re-laid with its share, in
  workers too.

Both sinks give byte-identical result files for the same input and options, whatever
the number of jobs or the engine (with ``time_limit`` set, refinement stops by the clock,
so a result can then depend on the machine's load).

Tensors that are not layers to regroup are skipped with a reason in ``Run.skipped``
(:func:`regroup.io.layer_pattern`): those known from the index alone (rank, embedding
tables, smaller than the block, or with format "nm" a column count M does not divide:
N:M groups are never padded) are never loaded nor counted by ``progress``; those
known once read (empty, fully or nearly dense: ``dense_above``) are reported to
``progress`` as skipped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write
from ._outputs import PartsDir, check_outputs, same_file
from .validation import RegroupError, check_choice, check_int
from .allocation import allot, apply_allotment, layer_offer
from .engine import regroup_pattern
from .executors import ENGINES, execute
from .io import layer_pattern, tensor_problem
from .pattern import Pattern
from .options import RegroupOptions, resolve_options
from .provenance import options_key, tool_versions
from .report import report_row, report_total
from .result import (LayerResult, assemble_result, damaged_part, layer_record, load_part,
                     save_part, save_result)
from .source import LayerRef, Source, open_source

__all__ = ["Run", "regroup_file", "regroup_checkpoint"]

# progress(name, done, total, info): called as each layer finishes a pass; info holds
# "status" ("done" or "skipped"), "shape" (tuple or None), "seconds", "retained",
# "reason" (skipped) and "cached" (resumed from a part), each None when not known.
Progress = Callable[[str, int, int, dict], None]


@dataclass
class Run:
    """The outcome of a run: the regrouped layers' records, the skipped tensors, the
    options and provenance; and the layers themselves (:func:`regroup_file`) or the
    result file they were written to (:func:`regroup_checkpoint`).

    Attributes
    ----------
    source : dict
        ``{"name", "sha256"}`` of the input.
    options : RegroupOptions
    records : list of dict
        Per layer, its record in the result file (:func:`regroup.result.layer_record`).
    seconds : list of float
        Per layer, wall-clock seconds (both passes with a global budget).
    skipped : list of (name, reason)
    layers : list of LayerResult or None
        The layouts, when held in memory.
    output : str or None
        The result file written, when streamed.
    stats : dict
        ``wall_seconds``, ``jobs``, ``engine`` and ``resumed`` (layers taken from the
        parts of an interrupted run).
    versions : dict
        Versions of regroup and the libraries that can shape a result.
    input_path : str or None
        The input file or directory, which :meth:`save` never overwrites.
    """

    source: dict[str, str]
    options: RegroupOptions
    records: list[dict[str, Any]]
    seconds: list[float | None]
    skipped: list[tuple[str, str]]
    layers: list[LayerResult] | None = None
    output: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=tool_versions)
    input_path: str | None = field(default=None, repr=False)

    def meta(self) -> dict[str, Any]:
        """The run information stored in the result file."""
        return {"source": self.source, "options": self.options.record(),
                "versions": self.versions,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}

    def save(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the result file (deterministic bytes; no wall-clock times).

        ``path`` must not be the input; an existing file there is replaced only when it is
        a regroup result file, or with ``force`` (:func:`regroup._outputs.check_outputs`).
        """
        target = check_outputs({"path": path}, "Run.save", inputs={"the input": self.input_path},
                               results=("path",), force=force)["path"]
        if self.layers is not None:
            save_result(target, self.layers, self.meta())
            return
        if self.output is None:
            raise RegroupError("this Run holds neither its layers nor a result file")
        if not same_file(target, self.output):
            with atomic_write(target, "wb") as f, open(self.output, "rb") as src:
                shutil.copyfileobj(src, f)

    def report(self) -> dict[str, Any]:
        """The JSON report: per layer metrics including seconds, plus a summary."""
        rows = [report_row(rec, s) for rec, s in zip(self.records, self.seconds)]
        return {**self.meta(), "layers": rows, "total": {**report_total(rows), **self.stats}}


# -- tasks (run in workers: module level, picklable arguments) ------------------------------
def _first_layer(part: Path, layer: str) -> LayerResult:
    """The layout a pass-1 part holds, checked as :func:`load_part` checks it (a damaged
    or changed part is named, with what to do)."""
    try:
        return load_part(part, layer)[1]
    except (OSError, ValueError) as exc:
        raise damaged_part(part, layer, exc) from None


def _part_matches(part: Path | None, record: dict[str, Any], layer: str,
                  shape: tuple[int, ...], opts: RegroupOptions
                  ) -> tuple[dict, LayerResult] | None:
    """The run information and layout of ``part`` when it can be reused: sealed and intact
    (:func:`load_part`: nothing in it is trusted otherwise), made from the same input and
    options (``record``), holding ``layer`` of ``shape`` at the block and format asked
    for. None otherwise: a missing, stale, damaged or changed part is recomputed."""
    if part is None or not part.exists():
        return None
    try:
        doc, r = load_part(part, layer)
    except (OSError, ValueError):
        return None
    if any(doc.get(k) != v for k, v in record.items()) or r.shape != tuple(shape) \
            or r.block_shape != tuple(opts.block) or r.format != opts.format \
            or r.nm != opts.nm:
        return None
    return doc, r


def usable_pattern(name: str, weight: Any, mask: Any, where: str, opts: RegroupOptions
                   ) -> tuple[Pattern | None, str | None]:
    """``(pattern, None)`` for a loaded tensor to regroup under ``opts``, or
    ``(None, why not)`` (the pipeline's rule; :mod:`regroup.sweep` uses it too)."""
    return layer_pattern(name, weight, mask, source=where, block=opts.block,
                         dense_above=opts.dense_above, skip_embeddings=not opts.named(name),
                         nm=opts.nm)


def index_problem(ref: LayerRef, opts: RegroupOptions) -> str | None:
    """Why ``ref`` is no layer to regroup, known before loading it (None: load it)."""
    if ref.problem is not None or ref.shape is None:
        return ref.problem
    return tensor_problem(ref.name, ref.shape, block=opts.block,
                          skip_embeddings=not opts.named(ref.name), nm=opts.nm)


def regroup_layer(source: Source, ref: LayerRef, opts: RegroupOptions, part: str | None,
                  key: str, offer: bool) -> dict[str, Any]:
    """Pass 1 for one layer: regroup it under its own budget. With a ``part`` path the
    layout is written there (and a matching part from an earlier run is reused);
    without, it is returned. ``offer``: also return its candidate blocks for a
    model-wide budget. Returns a small status record."""
    if ref.problem is not None:
        return {"name": ref.name, "status": "skipped", "reason": ref.problem}
    part = Path(part) if part is not None else None
    weight, mask, digest = source.load(ref)
    record = {"input_sha256": digest, "key": key}
    # Whether to skip is decided from the input every time, never taken from a part (so
    # skipped layers have no part).
    pat, reason = usable_pattern(ref.name, weight, mask, source.path, opts)
    del weight, mask
    if pat is None:
        return {"name": ref.name, "status": "skipped", "reason": reason}
    found = _part_matches(part, record, ref.name, pat.shape, opts)
    if found is not None:
        status = {"name": ref.name, "status": "done", "reason": None,
                  "seconds": found[0].get("seconds"), "cached": True}
        if offer:
            status["offer"] = layer_offer(pat, found[1])
        return status
    try:
        r = regroup_pattern(pat, options=opts.per_layer())
    except RegroupError as exc:
        raise type(exc)(f"{source.path}: {exc}") from None
    status = {"name": ref.name, "status": "done", "seconds": r.seconds,
              "retained": r.metrics["retained"]}
    if offer:
        status["offer"] = layer_offer(pat, r)
    if part is not None:
        save_part(part, [r], {**record, "status": "done", "seconds": r.seconds})
    else:
        status["result"] = r
    return status


def _kept_sha256(kept: np.ndarray) -> str:
    h = hashlib.sha256(str(kept.shape).encode())
    h.update(np.packbits(np.asarray(kept, bool)).tobytes())
    return h.hexdigest()


def allot_layer(source: Source, ref: LayerRef, opts: RegroupOptions, kept: np.ndarray,
                first: LayerResult | None, part_in: str | None, part: str | None,
                key: str) -> dict[str, Any]:
    """Pass 2 for one layer under a model-wide budget: re-lay its pass-1 layout
    (``first``, or the one in ``part_in``) with the blocks ``kept`` it was allotted,
    refined at that area; written to ``part`` (reused when it matches) or returned."""
    t0 = time.perf_counter()
    part = Path(part) if part is not None else None
    weight, mask, digest = source.load(ref)
    record = {"input_sha256": digest, "key": key, "kept_sha256": _kept_sha256(kept)}
    pat, reason = usable_pattern(ref.name, weight, mask, source.path, opts)
    if pat is None:   # pass 1 found a layer here: the input changed in between
        raise RegroupError(f"{source.path}: layer {ref.name!r} is no longer usable ({reason});"
                           " the file changed during the run - run again")
    found = _part_matches(part, record, ref.name, pat.shape, opts)
    if found is not None:
        return {"name": ref.name, "status": "done", "seconds": found[0].get("seconds"),
                "cached": True}
    if first is None:
        first = _first_layer(Path(part_in), ref.name)
    r = apply_allotment(pat, first, kept, opts.budget, layer_min=opts.layer_min,
                        refine=opts.refines, time_limit=opts.time_limit)
    r = replace(r, seconds=time.perf_counter() - t0)
    status = {"name": ref.name, "status": "done", "seconds": r.seconds,
              "retained": r.metrics["retained"]}
    if part is not None:
        save_part(part, [r], {**record, "status": "done", "seconds": r.seconds})
    else:
        status["result"] = r
    return status


# -- the run -------------------------------------------------------------------------------
def _run(path: str | os.PathLike, opts: RegroupOptions, out: str | os.PathLike | None, *,
         jobs: int, engine: str, scheduler: str | None, progress: Progress | None,
         caller: str, force: bool = False) -> Run:
    check_choice(engine, "engine", caller, set(ENGINES))
    opts.refuse_chain(caller)
    jobs = check_int(jobs, "jobs", caller, low=1, high=1024)
    t0 = time.perf_counter()
    where = os.fspath(path)
    # The output is checked, and its parts directory claimed (locked for this run), before
    # any work: a bad path fails at once, and two runs never write the same parts.
    parts_dir: PartsDir | None = None
    if out is not None:
        target = check_outputs({"out": out}, caller, inputs={"path": path}, results=("out",),
                               force=force)["out"]
        parts_dir = PartsDir.claim(target)
    try:
        source = open_source(path)
    except BaseException:
        if parts_dir is not None:
            parts_dir.keep()
        raise
    refs = source.refs
    # Parts are reused only under the same options and the same library versions.
    key = options_key({**opts.record(), "versions": tool_versions()})
    scope_global = opts.budget_scope == "global"

    def part(i: int, suffix: str = "") -> str | None:
        return None if parts_dir is None else str(parts_dir.path / f"{i}{suffix}.npz")

    def run_pass(fn, tasks, idx, label):
        statuses: dict[int, dict] = {}
        for j, status in execute(fn, tasks, jobs=jobs, engine=engine, scheduler=scheduler,
                                 costs=[refs[i].size for i in idx],
                                 labels=[refs[i].name for i in idx], where=where):
            statuses[idx[j]] = status
            if progress is not None:
                info = {k: status.get(k) for k in ("status", "seconds", "retained",
                                                   "reason", "cached")}
                progress(refs[idx[j]].name + label, len(statuses), len(idx),
                         {**info, "shape": refs[idx[j]].shape})
        return statuses

    try:
        if opts.layers is not None:
            keep = set(opts.select([r.name for r in refs], where=where))
            refs = [r for r in refs if r.name in keep]
        # Skips known from the index are settled here: such tensors are never loaded, and
        # the progress total counts only the layers that may be regrouped.
        early = {i: index_problem(r, opts) for i, r in enumerate(refs)}
        idx = [i for i in range(len(refs)) if early[i] is None]
        first = run_pass(regroup_layer,
                         [(source.for_layer(refs[i]), refs[i], opts, part(i), key,
                           scope_global) for i in idx], idx, "") if idx else {}
        done = [i for i in idx if first[i]["status"] == "done"]
        skipped = [(refs[i].name, early[i]) if early[i] is not None
                   else (first[i]["name"], first[i]["reason"]) for i in range(len(refs))
                   if early[i] is not None or first[i]["status"] == "skipped"]
        if not done:
            why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "it holds no tensor"
            more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
            if parts_dir is not None:
                parts_dir.discard()
                parts_dir = None
            raise RegroupError(f"{where}: no usable layer: {why}{more}")
        final = first
        final_part = {i: part(i) for i in done}
        seconds = {i: first[i].get("seconds") for i in done}
        if scope_global:
            kept = allot([first[i]["offer"] for i in done], opts.budget,
                         layer_min=opts.layer_min)
            final = run_pass(allot_layer,
                             [(source.for_layer(refs[i]), refs[i], opts, k,
                               first[i].get("result"), part(i), part(i, ".global"), key)
                              for i, k in zip(done, kept)], done, " (global budget)")
            final_part = {i: part(i, ".global") for i in done}
            seconds = {i: (seconds[i] or 0.0) + (final[i].get("seconds") or 0.0)
                       for i in done}
        # Every layer has been read: the input must still be the file that was hashed
        # when it was opened (size, mtime, inode, SHA-256), or the result would mix old
        # and new layers under the old hash. Checked before the result is written.
        source.verify()
        run = Run(source=source.record(), options=opts, records=[],
                  seconds=[seconds[i] for i in done], skipped=skipped,
                  stats={"jobs": jobs, "engine": engine,
                         "resumed": sum(bool(first[i].get("cached")) for i in done)},
                  input_path=where)
        if scope_global:
            run.stats["resumed_global"] = sum(bool(final[i].get("cached")) for i in done)
        if parts_dir is None:
            run.layers = [final[i]["result"] for i in done]
            run.records = [layer_record(r) for r in run.layers]
        else:
            run.records = assemble_result(target, [final_part[i] for i in done],
                                          [refs[i].name for i in done], run.meta())
            run.output = os.fspath(out)
            parts_dir.discard()
    except BaseException:
        # Finished parts stay for a rerun to resume from (an empty directory goes); the
        # cleanup must not mask the error being raised.
        if parts_dir is not None:
            parts_dir.keep()
        raise
    run.stats["wall_seconds"] = time.perf_counter() - t0
    return run


def regroup_file(path: str | os.PathLike, *, options: RegroupOptions | None = None,
                 jobs: int = 1, engine: str = "local", scheduler: str | None = None,
                 progress: Progress | None = None, **kwargs: Any) -> Run:
    """Regroup every selected layer of a mask or checkpoint, holding the results in memory.

    Parameters
    ----------
    path : str or path-like
        A file of any supported format, a sharded safetensors directory or its
        ``*.index.json`` (see :func:`regroup.source.open_source`).
    options : RegroupOptions, optional
        Every option, including ``layers`` (globs over weight names), ``budget_scope``
        and ``layer_min``; keyword arguments naming its fields are applied on top.
    jobs, engine, scheduler
        Worker processes (``engine="local"``) or a dask.distributed cluster
        (``engine="dask"``, ``scheduler`` its address; None starts a local one).
    progress : callable(name, done, total, info), optional
        Called as each layer to regroup finishes (total excludes the tensors skipped
        from the index alone); ``info`` holds its status, shape, seconds and retained
        fraction, or its skip reason (see ``Progress`` in :mod:`regroup.pipeline`).

    Returns
    -------
    Run
        ``run.layers`` holds the LayerResults; ``run.save(path)`` writes the result
        file, the same bytes as :func:`regroup_checkpoint` writes.

    Raises
    ------
    RegroupError
        No usable layer (the reasons listed), a layer glob matching nothing, a failing
        layer (named).
    """
    opts = resolve_options(options, "regroup_file", **kwargs)
    return _run(path, opts, None, jobs=jobs, engine=engine, scheduler=scheduler,
                progress=progress, caller="regroup_file")


def regroup_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *,
                       options: RegroupOptions | None = None, jobs: int = 1,
                       engine: str = "local", scheduler: str | None = None,
                       progress: Progress | None = None, force: bool = False,
                       **kwargs: Any) -> Run:
    """Regroup every selected layer of a checkpoint into the result file ``out``,
    streamed: one layer in memory per worker, finished layers kept in ``OUT.parts`` so
    that an interrupted run resumes. Arguments as :func:`regroup_file`.

    ``out`` is checked before any work: not the input, a regular file or a new one in an
    existing directory, and, when it exists, a regroup result file (replaced) unless
    ``force``. ``OUT.parts`` is created with an ownership marker and locked for the run; one
    regroup did not create is refused, as is a second run on the same ``out``.

    Returns
    -------
    Run
        With ``run.output == out`` and ``run.layers`` None (``load_result(out)`` reads
        them); ``run.report()`` is the JSON report.

    Raises
    ------
    RegroupError
        As :func:`regroup_file`; a refused ``out`` or ``OUT.parts`` (named), or another
        run writing ``out``.
    KeyboardInterrupt
        Propagated after stopping the workers; finished layers stay in ``OUT.parts``
        for the next run, no result file is written.
    """
    opts = resolve_options(options, "regroup_checkpoint", **kwargs)
    return _run(path, opts, out, jobs=jobs, engine=engine, scheduler=scheduler,
                progress=progress, caller="regroup_checkpoint", force=force)
