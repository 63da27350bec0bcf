"""Sources: a checkpoint's layers, indexed once and loaded one at a time.

:func:`open_source` indexes one file of any supported format, a Hugging Face style
sharded directory (``model.safetensors.index.json``) or a directory of ``.safetensors``
shards. Safetensors shards and .npz archives are indexed from their headers, PyTorch zip
checkpoints through memory-mapped storages; :meth:`Source.load` then reads only one
layer's bytes. Single-tensor formats and pre-1.6 PyTorch pickles are read whole, and
:meth:`Source.for_layer` hands a worker only its own layer's tensors.

Each file is hashed as it is indexed (one handle) and recorded - size, modification time,
inode, SHA-256; every later load checks it is unchanged, and :meth:`Source.verify` reads
it again before a result is written, so a result never mixes layers of two versions of
an input under one hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .validation import FormatError, RegroupError, check_regular, open_regular
from .io import (SUFFIXES, TORCH_SUFFIXES, group_tensors, index_file, mapped_torch,
                 read_npz_members, read_tensors, shape_problem)
from .io.safetensors import read_safetensors, safetensors_index, safetensors_record
from .provenance import FileRecord, file_record, file_stamp, tensor_bytes, update_digest

__all__ = ["Source", "LayerRef", "open_source", "INDEX_NAME"]

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
    shape: tuple[int, ...] | None = None  # of its mask (else weight); None: not known


@dataclass
class Source:
    """A checkpoint's layers, loadable one at a time (picklable: workers reopen it)."""

    path: str
    refs: list[LayerRef]
    digest: str                             # identifies the checkpoint (source sha256)
    tensors: dict[str, Any] | None = None   # a file that can only be read whole
    _index: dict[str, dict] = field(default_factory=dict, repr=False)
    # Each file the digest covers, as it was when opened: checked after every load on
    # the machine that opened it (size, mtime, inode: a dask worker elsewhere sees its own
    # mount of the file) and before a result is written (and its SHA-256; verify()).
    _files: dict[str, FileRecord] = field(default_factory=dict, repr=False)
    _host: str = field(default_factory=platform.node, repr=False)

    def record(self) -> dict[str, str]:
        """The source as recorded in result files: the file's (or checkpoint directory's)
        name and its SHA-256 (a directory's: of its shards' hashes, in index order)."""
        where = Path(self.path)
        if where.name.endswith(".index.json"):
            where = where.parent          # the checkpoint, however it was named
        return {"name": where.name or where.resolve().name, "sha256": self.digest}

    def for_layer(self, ref: LayerRef) -> Source:
        """What a worker needs to load ``ref``: pickled with every task, so it carries
        that layer's tensors and header entries, never the whole checkpoint's (its size
        does not grow with the number of tensors)."""
        keys = [k for k in (ref.weight, ref.mask) if k]
        index = {s: {k: self._index[s][k] for k in keys if k in self._index[s]}
                 for s in ref.shards or (self.path,) if s in self._index}
        files = ref.shards if ref.shards else (self.path,) if self.tensors is None else ()
        return replace(self, refs=[ref],
                       tensors=None if self.tensors is None else
                       {k: self.tensors[k] for k in keys},
                       _index=index,
                       _files={f: self._files[f] for f in files if f in self._files})

    def _unchanged(self, path: str) -> None:
        """Raise when the file ``path`` no longer is as it was when the source was opened
        (size, modification time, inode and device: ``stat``, not a read)."""
        rec = self._files.get(path)
        if rec is None or platform.node() != self._host:
            return
        try:
            now = self._stamp(path)
        except (OSError, RegroupError) as exc:
            raise _changed(path, str(exc)) from None
        if now != rec.stamp():
            raise _changed(path, ", ".join(what for what, a, b in zip(
                ("size", "modification time", "inode", "device"), rec.stamp(), now)
                if a != b))

    @staticmethod
    def _stamp(path: str) -> tuple[int, int, int, int]:
        return file_stamp(check_regular(path, "input"))

    @property
    def _zip_torch(self) -> bool:
        return (Path(self.path).suffix.lower() in TORCH_SUFFIXES
                and self.path in self._files and self.tensors is None)

    def _mapped(self, keys: list[str]) -> dict[str, Any]:
        """The tensors ``keys`` of this PyTorch zip checkpoint, from its state dict
        mapped once per process and file version (:data:`_MAPPED`)."""
        key = (self.path, self._files[self.path].stamp())
        flat = _MAPPED.get(key)
        if flat is None:
            _MAPPED.clear()                 # one file at a time: the last one read
            flat = _MAPPED[key] = mapped_torch(self.path)
        return {k: flat[k] for k in keys if k in flat}

    def _indexed(self, path: str) -> bool:
        """Whether ``path`` is still the file that was indexed, as far as ``stat`` tells
        (True when nothing was recorded of it)."""
        rec = self._files.get(path)
        try:
            return rec is None or self._stamp(path) == rec.stamp()
        except (OSError, RegroupError):
            return False

    def verify(self) -> None:
        """Check that every file of the source is as it was when opened - size,
        modification time, inode and SHA-256 (read again) - so that a result is never
        written from an input that changed during the run, under its old hash.

        Raises
        ------
        RegroupError
            A file changed, was replaced or removed ("input changed during the run").
        """
        _MAPPED.clear()                     # the run is over: unmap its checkpoint
        for path in self._files:
            self._unchanged(path)
            self._same_content(path)

    def _same_content(self, path: str) -> None:
        """Raise when the SHA-256 of ``path``, read again, differs from when it was
        opened (nothing to check when it was not recorded)."""
        rec = self._files.get(path)
        if rec is None:
            return
        try:
            digest = file_record(path).sha256
        except (OSError, RegroupError) as exc:
            raise _changed(path, str(exc)) from None
        if digest != rec.sha256:
            raise _changed(path, "its content (SHA-256)")

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
                self._unchanged(shard)
        else:
            # An .npz member is read where indexing found it, a PyTorch zip checkpoint's
            # tensors from its state dict mapped once per process, while the file is the
            # one indexed (each layer costs its own size, not the file's tensor count); a
            # changed file is read afresh, to name what changed.
            direct = self.tensors is None and self._indexed(self.path)
            try:
                got = ({k: self.tensors[k] for k in keys} if self.tensors is not None
                       else read_npz_members(self.path, self._index[self.path], keys)
                       if direct and self.path in self._index
                       else self._mapped(keys) if direct and self._zip_torch
                       else read_tensors(self.path, keys))
            except FormatError:
                if direct:                  # damaged, or rewritten under the same stamp?
                    self._same_content(self.path)
                raise
            if len(got) < len(keys):
                raise FormatError(f"{self.path}: layer {ref.name!r}: tensor(s) "
                                  f"{sorted(set(keys) - set(got))} are gone; the file "
                                  "changed since it was indexed - run again")
            if self.tensors is None:
                self._unchanged(self.path)
            for k in keys:
                update_digest(h, k, *tensor_bytes(got[k]))
        return (got.get(ref.weight) if ref.weight else None,
                got.get(ref.mask) if ref.mask else None, h.hexdigest())


# The memory-mapped state dict of the PyTorch zip checkpoint this process loads layers
# from, by (path, size, mtime, inode, device): its pickle, whose parsing is linear in the
# tensor count, is read once per process, not once per layer.
_MAPPED: dict[tuple, dict[str, Any]] = {}


def _changed(path: str, why: str) -> RegroupError:
    return RegroupError(f"{path}: input changed during the run ({why}); no result was "
                        "written - run again once the file is complete")


def _elements(v: Any) -> int:
    shape = getattr(v, "shape", ())
    return int(np.prod(tuple(shape), dtype=object)) if shape is not None else 0


def _shape(v: Any) -> tuple[int, ...] | None:
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _shards(path: Path) -> tuple[list[Path], dict[str, Path] | None, Path | None]:
    """The shards of a checkpoint directory or index, the index's ``weight_map`` (tensor
    -> shard path) and the index itself (both None for a directory without an index)."""
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists() or index.is_symlink():
            return (*_from_index(index), index)
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise RegroupError(f"{path}: a directory without {INDEX_NAME} or .safetensors "
                               "shards; pass a checkpoint file or a sharded checkpoint")
        return shards, None, None
    return (*_from_index(path), path)


_SERIES = re.compile(r"(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors")


def _unused_shards(index: Path, shards: list[Path]) -> None:
    """Every shard of the index's series (``model-00002-of-00003.safetensors``: same stem
    and count as the shards it names) must be named by it: the tensors of another would
    be silently left out. Other ``.safetensors`` files beside it (a consolidated copy, an
    adapter) are not the index's and are left alone."""
    series = {(m["stem"], m["n"]) for m in map(_SERIES.fullmatch, (p.name for p in shards))
              if m is not None}
    named = {p.name for p in shards}
    unused = []
    for p in index.parent.glob("*.safetensors"):
        m = _SERIES.fullmatch(p.name)
        if m is not None and (m["stem"], m["n"]) in series and p.name not in named:
            unused.append(p.name)
    missing = [f"{stem}-{i:0{len(n)}d}-of-{n}.safetensors" for stem, n in series
               for i in range(1, int(n) + 1) if int(n) <= 100_000
               and f"{stem}-{i:0{len(n)}d}-of-{n}.safetensors" not in named]
    if unused:
        raise FormatError(f"{index}: shard(s) {', '.join(map(repr, sorted(unused)[:5]))} of "
                          "the checkpoint are not named by the index, so their tensors "
                          "would be ignored; fix the index or move them away")
    if missing:
        raise FormatError(f"{index}: the index names no tensor in shard(s) "
                          f"{', '.join(map(repr, sorted(missing)[:5]))} of its series; a "
                          "complete checkpoint uses every shard")


def _from_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shards an index names (in order of first use) and its tensor -> shard map;
    every shard must exist inside the index's directory (as a regular file)."""
    try:
        with open_regular(index, "safetensors index") as f:
            doc = json.loads(f.read())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("'weight_map' must map tensor names to shard file names")
        names = list(dict.fromkeys(weight_map.values()))
    except RecursionError:
        raise FormatError(f"{index}: not a safetensors index (JSON nested too deeply)") \
            from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, RegroupError):
            raise
        raise FormatError(f"{index}: not a safetensors index (needs a 'weight_map' of "
                          f"tensor -> shard): {type(exc).__name__}: {exc}") from None
    folder = index.parent.resolve()
    shards = {}
    for n in names:
        try:
            p = (index.parent / n).resolve()
            inside = folder in p.parents
            exists = p.exists()
        except (ValueError, OSError) as exc:     # e.g. a NUL byte in the name
            raise FormatError(f"{index}: shard name {n!r} is not a usable path ({exc})") \
                from None
        if not inside:
            raise FormatError(f"{index}: shard {n!r} lies outside the checkpoint directory")
        if not exists:
            raise FormatError(f"{index}: shard {n!r} is missing")
        check_regular(p, f"shard {n!r} of {index}")
        shards[n] = p
    return list(shards.values()), {k: shards[v] for k, v in weight_map.items()}


def open_source(path: str | os.PathLike) -> Source:
    """Index a checkpoint: a file of any supported format, a sharded safetensors directory,
    or its ``*.index.json``. Safetensors are indexed from headers only.

    Every file is refused unless regular (a FIFO or device is never opened) and is
    hashed as it is indexed, through the same handle (:func:`regroup.io.index_file`);
    :meth:`Source.verify` checks it again before a result is written. A sharded
    checkpoint's index must agree with its shards: each tensor it names is in the shard
    it names, and each shard's tensors are all named, to that shard.

    Raises
    ------
    FileNotFoundError
    RegroupError
        Not a regular file, directory or index; an unknown suffix.
    FormatError
        A damaged file; an index that disagrees with its shards (naming the tensor and
        the shard).
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    weight_map = index_json = None
    if path.is_dir() or path.name.endswith(".index.json"):
        shards, weight_map, index_json = _shards(path)
    elif path.suffix.lower() == ".safetensors":
        shards = [path]
    elif path.suffix.lower() in SUFFIXES:
        shapes, tensors, record, members = index_file(path)
        files = {str(path): record}
        if shapes is None:           # read whole; layer problems are found when loaded
            refs = [LayerRef(n, w, m, size=_elements(tensors[m or w]),
                             shape=_shape(tensors[m or w]))
                    for n, w, m in group_tensors(tensors, str(path))]
            return Source(str(path), refs, record.sha256, tensors, _files=files)
        refs = [LayerRef(n, w, m, (), shape_problem(shapes[m or w]),
                         int(np.prod(shapes[m or w], dtype=object)), tuple(shapes[m or w]))
                for n, w, m in group_tensors(shapes, str(path))]
        return Source(str(path), refs, record.sha256,
                      _index={} if members is None else {str(path): members}, _files=files)
    else:
        raise RegroupError(f"{path}: unknown file type {path.suffix!r}; supported: "
                           f"{', '.join(SUFFIXES)}, a sharded directory or *.index.json")
    where: dict[str, tuple[str, tuple]] = {}
    indexes = {}
    files = {}
    for shard in shards:
        index, files[str(shard)] = safetensors_record(shard)
        indexes[str(shard)] = index
        for k, (_, shape, _, _) in index.items():
            if k in where:
                raise FormatError(f"{path}: tensor {k!r} appears in two shards "
                                  f"({where[k][0]} and {shard})")
            if weight_map is not None and weight_map.get(k) != shard:
                listed = weight_map.get(k)
                raise FormatError(
                    f"{path}: shard {shard.name!r} holds tensor {k!r}, which the index "
                    + ("does not name" if listed is None else f"puts in {listed.name!r}")
                    + "; fix the index (its tensors would be ignored)")
            where[k] = (str(shard), shape)
    if weight_map is not None and len(weight_map) != len(where):
        k = next(k for k in weight_map if k not in where)
        raise FormatError(f"{path}: the index names tensor {k!r} in shard "
                          f"{weight_map[k].name!r}, which does not hold it")
    if index_json is not None:
        _unused_shards(index_json, shards)
    refs = []
    for name, w, m in group_tensors(where, str(path)):
        shape = where[m or w][1]
        refs.append(LayerRef(name, w, m, tuple(dict.fromkeys(where[k][0] for k in (w, m) if k)),
                             shape_problem(shape), int(np.prod(shape, dtype=object)),
                             tuple(int(s) for s in shape)))
    if len(shards) == 1 and not path.is_dir() and not path.name.endswith(".index.json"):
        digest = files[str(shards[0])].sha256
    else:  # a checkpoint directory: the hash of its shards' hashes, in index order
        h = hashlib.sha256()
        for shard in shards:
            h.update(f"{shard.name}:{files[str(shard)].sha256}\n".encode())
        digest = h.hexdigest()
    src = Source(str(path), refs, digest, _files=files)
    src._index = indexes
    return src
