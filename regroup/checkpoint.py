"""Whole checkpoints: streamed layer by layer, in parallel, resumable.

:func:`regroup_checkpoint` regroups every layer of a checkpoint - one file, a Hugging Face
style sharded directory (``model.safetensors.index.json``), or a directory of
``.safetensors`` shards - holding one layer in memory per worker:

- safetensors shards and .npz archives are indexed from their headers, PyTorch zip
  checkpoints through memory-mapped storages; each worker reads only its layer's bytes.
  Single-tensor formats and pre-1.6 PyTorch pickles are read whole, and each worker is
  sent only its layer's tensors.
- Each finished layer is written at once to ``OUT.parts/<i>.npz`` with the SHA-256 of its
  input tensors and the options. A rerun skips layers whose part matches (resume after an
  interruption); anything else is recomputed. The result file is assembled at the end,
  entry by entry (never all masks in memory), atomically, and the parts are removed: an
  interrupted run leaves no partial result file.
- ``jobs > 1`` runs layers in worker processes; ``engine="dask"`` sends them to a
  dask.distributed scheduler (workers must see the checkpoint and OUT's directory).
  Every layer depends only on its input and the seed, so the result file is byte-identical
  to a serial run, and to :func:`regroup.regroup_file` on the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write
from ._validation import FormatError, RegroupError, check_block, check_choice, check_int
from .blocks import Budget
from .engine import (Run, _sha256, regroup_pattern, report_row, report_total, run_options,
                     select_layers, tool_versions)
from .io import (SUFFIXES, group_tensors, layer_pattern, read_tensors, shape_problem,
                 tensor_shapes)
from .io.safetensors import read_safetensors, safetensors_index
from .partitioners import format_method, parse_method
from .result import FORMAT_VERSION, _add, _copy_entry, save_result

__all__ = ["regroup_checkpoint", "open_source", "Source", "LayerRef", "ENGINES"]

ENGINES = ("local", "dask")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class LayerRef:
    """One layer of a source: its tensors (by key) and where they live."""

    name: str
    weight: str | None
    mask: str | None
    shards: tuple[str, ...] = ()  # safetensors files holding them (): the source's file
    problem: str | None = None    # known from the header alone: not a layer
    size: int = 0                 # elements of its weight: the scheduling cost estimate


@dataclass
class Source:
    """A checkpoint's layers, loadable one at a time (picklable: workers reopen it)."""

    path: str
    refs: list[LayerRef]
    digest: str                             # identifies the checkpoint (source sha256)
    tensors: dict[str, Any] | None = None   # a file that can only be read whole
    _index: dict[str, dict] = field(default_factory=dict, repr=False)

    def for_layer(self, ref: LayerRef) -> Source:
        """What a worker needs to load ``ref``: pickled with every task, so it carries
        that layer's tensors and shard headers, never the whole checkpoint's."""
        keys = [k for k in (ref.weight, ref.mask) if k]
        return replace(self, refs=[ref],
                       tensors=None if self.tensors is None else
                       {k: self.tensors[k] for k in keys},
                       _index={s: self._index[s] for s in ref.shards if s in self._index})

    def load(self, ref: LayerRef) -> tuple[Any, Any, str]:
        """The layer's (weight, mask) arrays and the SHA-256 of its input tensors."""
        h = hashlib.sha256()
        keys = [k for k in (ref.weight, ref.mask) if k]
        if ref.shards:
            got: dict[str, Any] = {}
            for shard in ref.shards:
                index = self._index.get(shard)
                if index is None:
                    index = self._index[shard] = safetensors_index(shard)[0]
                got.update(read_safetensors(shard, [k for k in keys if k in index],
                                            index=index, digest=h))
        else:
            got = ({k: self.tensors[k] for k in keys} if self.tensors is not None
                   else read_tensors(self.path, keys))
            if len(got) < len(keys):
                raise FormatError(f"{self.path}: layer {ref.name!r}: tensor(s) "
                                  f"{sorted(set(keys) - set(got))} are gone; the file "
                                  "changed since it was indexed - run again")
            for k in keys:
                dtype, shape, raw = _raw(got[k])
                h.update(f"{k}|{dtype}|{shape}|".encode())
                h.update(raw)
        return (got.get(ref.weight) if ref.weight else None,
                got.get(ref.mask) if ref.mask else None, h.hexdigest())


def _raw(v: Any) -> tuple[str, list[int], bytes]:
    """dtype, shape and bytes of an in-memory tensor (numpy, torch incl. bf16, Pattern)."""
    if hasattr(v, "matrix"):                     # a Pattern (.smtx / .mtx input)
        m = v.matrix.tocsr()
        return "csr", list(m.shape), m.indptr.tobytes() + m.indices.tobytes() + m.data.tobytes()
    if hasattr(v, "detach"):                     # torch: bytes through a uint8 view
        import torch                             # already loaded: it made the tensor
        t = v.detach().cpu().contiguous()
        return str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()
    a = np.ascontiguousarray(v)
    return str(a.dtype), list(a.shape), a.tobytes()


def _elements(v: Any) -> int:
    shape = getattr(v, "shape", ())
    return int(np.prod(tuple(shape), dtype=object)) if shape is not None else 0


def _shards(path: Path) -> list[Path]:
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            return _from_index(index)
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise RegroupError(f"{path}: a directory without {INDEX_NAME} or .safetensors "
                               "shards; pass a checkpoint file or a sharded checkpoint")
        return shards
    return _from_index(path)


def _from_index(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{index}: not a safetensors index (needs a 'weight_map' of "
                          f"tensor -> shard): {type(exc).__name__}: {exc}") from None
    shards = []
    for n in names:
        try:
            p = (index.parent / str(n)).resolve()
            inside = index.parent.resolve() in p.parents
            exists = p.is_file()
        except (ValueError, OSError) as exc:     # e.g. a NUL byte in the name
            raise FormatError(f"{index}: shard name {n!r} is not a usable path ({exc})") \
                from None
        if not inside:
            raise FormatError(f"{index}: shard {n!r} lies outside the checkpoint directory")
        if not exists:
            raise FormatError(f"{index}: shard {n!r} is missing")
        shards.append(p)
    return shards


def open_source(path: str | os.PathLike) -> Source:
    """Index a checkpoint: a file of any supported format, a sharded safetensors directory,
    or its ``*.index.json``. Safetensors are indexed from headers only."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() or path.name.endswith(".index.json"):
        shards = _shards(path)
    elif path.suffix.lower() == ".safetensors":
        shards = [path]
    elif path.suffix.lower() in SUFFIXES:
        shapes = tensor_shapes(path)
        if shapes is None:           # read whole; layer problems are found when loaded
            tensors = read_tensors(path)
            refs = [LayerRef(n, w, m, size=_elements(tensors[m or w]))
                    for n, w, m in group_tensors(tensors)]
            return Source(str(path), refs, _sha256(path), tensors)
        refs = [LayerRef(n, w, m, (), shape_problem(shapes[m or w]),
                         int(np.prod(shapes[m or w], dtype=object)))
                for n, w, m in group_tensors(shapes)]
        return Source(str(path), refs, _sha256(path))
    else:
        raise RegroupError(f"{path}: unknown file type {path.suffix!r}; supported: "
                           f"{', '.join(SUFFIXES)}, a sharded directory or *.index.json")
    where: dict[str, tuple[str, tuple]] = {}
    indexes = {}
    for shard in shards:
        index, _ = safetensors_index(shard)
        indexes[str(shard)] = index
        for k, (_, shape, _, _) in index.items():
            if k in where:
                raise FormatError(f"{path}: tensor {k!r} appears in two shards "
                                  f"({where[k][0]} and {shard})")
            where[k] = (str(shard), shape)
    refs = []
    for name, w, m in group_tensors(where):
        shape = where[m or w][1]
        refs.append(LayerRef(name, w, m, tuple(dict.fromkeys(where[k][0] for k in (w, m) if k)),
                             shape_problem(shape), int(np.prod(shape, dtype=object))))
    if len(shards) == 1 and not path.is_dir() and not path.name.endswith(".index.json"):
        digest = _sha256(path)
    else:  # a checkpoint directory: the hash of its shards' hashes, in index order
        h = hashlib.sha256()
        for shard in shards:
            h.update(f"{shard.name}:{_sha256(shard)}\n".encode())
        digest = h.hexdigest()
    src = Source(str(path), refs, digest)
    src._index = indexes
    return src


# -- one layer (runs in a worker) -----------------------------------------------------------
def _options_key(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()
                          ).hexdigest()


def _part_meta(part: Path) -> dict | None:
    try:
        with zipfile.ZipFile(part) as zf:
            return json.loads(zf.read("meta.json"))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None


def regroup_layer(source: Source, ref: LayerRef, options: dict[str, Any], part: str,
                  key: str, threads: int | None = None) -> dict[str, Any]:
    """Regroup one layer of ``source`` into the part file ``part`` (skipping it when the
    part already holds this input and these options). Returns a small status record.
    ``threads`` caps the BLAS threads of this call (workers sharing the cores) through
    threadpoolctl; without it installed the cap is not applied, which costs speed only."""
    if threads is not None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            with threadpool_limits(limits=threads):
                return regroup_layer(source, ref, options, part, key)
    part = Path(part)
    if ref.problem is not None:
        return {"name": ref.name, "status": "skipped", "reason": ref.problem}
    weight, mask, digest = source.load(ref)
    done = _part_meta(part) if part.exists() else None
    if done is not None and done.get("input_sha256") == digest and done.get("key") == key:
        return {"name": ref.name, "status": done["status"], "reason": done.get("reason"),
                "seconds": done.get("seconds"), "cached": True}
    block = tuple(options["block"])
    pat, reason = layer_pattern(ref.name, weight, mask, source=source.path, block=block)
    del weight, mask
    record = {"input_sha256": digest, "key": key}
    if pat is None:
        with atomic_write(part, "wb") as f, zipfile.ZipFile(f, "w") as zf:
            _add(zf, "meta.json", json.dumps({**record, "status": "skipped",
                                              "reason": reason}).encode())
        return {"name": ref.name, "status": "skipped", "reason": reason}
    name, opts = parse_method(options["method"])
    try:
        r = regroup_pattern(pat, block=block, format=options["format"], method=name,
                            budget=options["budget"], seed=options["seed"],
                            objective=options["objective"], edge=options["edge"],
                            time_limit=options["time_limit"], params=opts,
                            refine=options["refine"])
    except RegroupError as exc:
        raise type(exc)(f"{source.path}: {exc}") from None
    save_result(part, [r], {**record, "status": "done", "seconds": r.seconds})
    return {"name": ref.name, "status": "done", "seconds": r.seconds}


# -- the whole checkpoint -------------------------------------------------------------------
def _damaged_part(part: Path, layer: str, why: Exception | str) -> RegroupError:
    return RegroupError(f"{part}: the finished part of layer {layer!r} is damaged ({why}); "
                        "delete it and run again to recompute that layer")


def _assemble(out: str, parts: list[Path], names: list[str], meta: dict[str, Any]
              ) -> list[dict]:
    """Write the result file from the parts (of the layers ``names``), one array at a
    time; the bytes equal :func:`regroup.save_result` of the same layers."""
    layer_docs = []
    for i, p in enumerate(parts):
        doc = _part_meta(p)
        if doc is None or not doc.get("layers"):
            raise _damaged_part(p, names[i], "no readable layer record")
        lm = dict(doc["layers"][0])
        lm["entry"] = f"layers/{i}/"
        layer_docs.append(lm)
    doc = {**meta, "format_version": FORMAT_VERSION, "layers": layer_docs}
    with atomic_write(out, "wb") as f, zipfile.ZipFile(f, "w") as zf:
        _add(zf, "meta.json", json.dumps(doc, indent=1, sort_keys=True).encode())
        for i, p in enumerate(parts):
            # Only reading the part is guarded: an error writing ``out`` (a full disk) is
            # not the part's fault and propagates as it is.
            try:
                src = zipfile.ZipFile(p)
            except (OSError, zipfile.BadZipFile) as exc:
                raise _damaged_part(p, names[i], exc) from None
            with src:
                for entry in src.namelist():
                    if entry.startswith("layers/0/"):
                        try:
                            _copy_entry(zf, f"layers/{i}/" + entry[len("layers/0/"):], src,
                                        entry)
                        except FormatError as exc:
                            raise _damaged_part(p, names[i], exc) from None
    return layer_docs


def regroup_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *,
                       layers: str | list[str] | None = None, block: Any = 32,
                       format: str = "grid", method: str = "auto",
                       budget: Budget | str = "iso", seed: int = 0,
                       objective: str = "auto", edge: str = "partial",
                       time_limit: float | None = None, params: dict[str, Any] | None = None,
                       refine: bool | None = None, jobs: int = 1, engine: str = "local",
                       scheduler: str | None = None,
                       progress: Callable[[str, int, int], None] | None = None
                       ) -> dict[str, Any]:
    """Regroup every selected layer of a checkpoint into the result file ``out``.

    Options are those of :func:`regroup.regroup_file` (per-layer budgets only). ``jobs``
    worker processes (``engine="local"``), or a dask.distributed cluster
    (``engine="dask"``, ``scheduler`` its address; None starts a local one with ``jobs``
    workers). ``progress(name, done, total)`` is called as layers finish.

    Returns the JSON report (as :meth:`regroup.Run.report`, plus ``resumed``: the layers
    taken from an earlier interrupted run).

    Raises
    ------
    RegroupError
        No usable layer, a layer glob that matches nothing, a failing layer (named).
    KeyboardInterrupt
        Propagated after stopping the workers; finished layers stay in ``OUT.parts``
        for the next run, no result file is written.
    """
    caller = "regroup_checkpoint"
    block = check_block(block, caller)
    check_choice(format, "format", caller, {"grid", "shuffled"})
    check_choice(engine, "engine", caller, set(ENGINES))
    jobs = check_int(jobs, "jobs", caller, low=1, high=1024)
    budget = Budget.parse(budget)
    name, opts = parse_method(method, params)
    source = open_source(path)
    refs = source.refs
    if layers is not None:
        keep = set(select_layers([r.name for r in refs], layers, where=os.fspath(path)))
        refs = [r for r in refs if r.name in keep]
    options = run_options(block=block, format=format, method=format_method(name, opts),
                          budget=budget, seed=seed, objective=objective, edge=edge,
                          layers=layers, time_limit=time_limit, refine=refine)
    key = _options_key({**options, "version": tool_versions()["regroup"]})
    parts_dir = Path(os.fspath(out) + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = [parts_dir / f"{i}.npz" for i in range(len(refs))]
    statuses: list[dict | None] = [None] * len(refs)
    t0 = time.perf_counter()
    tasks = [(source.for_layer(ref), ref, options, str(part), key)
             for ref, part in zip(refs, parts)]
    try:
        for i, status in _execute(tasks, jobs, engine, scheduler):
            statuses[i] = status
            if progress is not None:
                progress(refs[i].name, sum(s is not None for s in statuses), len(refs))
    except BaseException:
        # Nothing to resume from: leave nothing behind. The cleanup must not mask the
        # error being raised, so a directory already gone (or not empty) is left as is.
        with contextlib.suppress(OSError):
            parts_dir.rmdir()
        raise
    done = [i for i, s in enumerate(statuses) if s["status"] == "done"]
    skipped = [(s["name"], s["reason"]) for s in statuses if s["status"] == "skipped"]
    if not done:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "it holds no tensor"
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        shutil.rmtree(parts_dir, ignore_errors=True)
        raise RegroupError(f"{path}: no usable layer: {why}{more}")
    where = Path(os.fspath(path))
    if where.name.endswith(".index.json"):
        where = where.parent          # the checkpoint, however it was named
    run = Run(source={"name": where.resolve().name, "sha256": source.digest},
              layers=[], skipped=skipped, options=options)
    layer_docs = _assemble(os.fspath(out), [parts[i] for i in done],
                           [refs[i].name for i in done], run.meta())
    shutil.rmtree(parts_dir, ignore_errors=True)
    rows = [report_row(lm, statuses[i].get("seconds")) for i, lm in zip(done, layer_docs)]
    total = {**report_total(rows), "wall_seconds": time.perf_counter() - t0, "jobs": jobs,
             "engine": engine, "resumed": sum(bool(statuses[i].get("cached")) for i in done)}
    return {**run.meta(), "layers": rows, "total": total}


def _largest_first(tasks: list[tuple]) -> list[int]:
    """Task indices by decreasing layer size (ties: file order). Handing the longest
    layers out first keeps one worker from finishing alone with a big layer at the end;
    the result does not depend on the order."""
    return sorted(range(len(tasks)), key=lambda i: (-tasks[i][1].size, i))


def _execute(tasks: list[tuple], jobs: int, engine: str, scheduler: str | None):
    """Yield ``(task index, status)`` as layers finish."""
    if engine == "dask":
        yield from _execute_dask(tasks, jobs, scheduler)
        return
    if jobs == 1:
        for i, t in enumerate(tasks):
            yield i, regroup_layer(*t)
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    # "spawn": workers never inherit the parent's threads (BLAS, torch) mid-state.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    order = _largest_first(tasks)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = {ex.submit(regroup_layer, *tasks[i], threads): i for i in order}
        try:
            for fut in cf.as_completed(futures):
                try:
                    status = fut.result()
                except cf.process.BrokenProcessPool:
                    # Which worker died is not reported; the pool hands tasks out in
                    # ``order``, at most jobs + 1 at a time, so it ran one of these.
                    ok = {i for f, i in futures.items()
                          if f.done() and not f.cancelled() and f.exception() is None}
                    suspects = [tasks[i][1].name for i in order if i not in ok]
                    raise _worker_died(tasks[0][0].path, suspects[:jobs + 1]) from None
                yield futures[fut], status
        except BaseException:
            for fut in futures:
                fut.cancel()
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_died(path: str, layers: list[str]) -> RegroupError:
    named = ", ".join(map(repr, layers[:6])) + (f" (and {len(layers) - 6} more)"
                                                 if len(layers) > 6 else "")
    return RegroupError(
        f"{path}: a worker process died while regrouping "
        f"{'layer' if len(layers) == 1 else 'one of the layers'} {named} "
        "(killed for memory, or a crash in native code); "
        "finished layers are kept: rerun to resume, with fewer --jobs if memory ran out or "
        "--time-limit to run each partitioner in its own process")


def _execute_dask(tasks: list[tuple], jobs: int, scheduler: str | None):
    try:
        from distributed import Client, KilledWorker, LocalCluster, as_completed
    except ImportError:
        from ._validation import missing_dependency
        raise missing_dependency("distributed", "engine 'dask'") from None
    cluster = None
    threads = None
    if scheduler is None:
        import dask
        # Worker processes (one task at a time each), as a real cluster's would be. With
        # no dashboard to show them, the workers' statistical profiles (a stack sample
        # every 10 ms) would only take time from the layers.
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        threads = max(1, (os.cpu_count() or 1) // jobs)
    client = Client(scheduler if scheduler is not None else cluster)
    try:
        order = _largest_first(tasks)
        futures = [client.submit(regroup_layer, *tasks[i], threads,
                                 key=f"regroup-{i}-{tasks[i][4][:12]}", pure=False,
                                 priority=len(order) - rank)
                   for rank, i in enumerate(order)]
        index = {f.key: i for f, i in zip(futures, order)}
        for fut in as_completed(futures):
            try:
                status = fut.result()
            except KilledWorker:
                # The scheduler retried it on other workers first; tasks queued on a dying
                # worker are suspected with the one it ran, so all known ones are named.
                killed = [tasks[index[f.key]][1].name for f in futures
                          if f.status == "error" and isinstance(f.exception(), KilledWorker)]
                raise _worker_died(tasks[0][0].path, killed) from None
            yield index[fut.key], status
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
