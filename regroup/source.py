"""Sources: a checkpoint's layers, indexed once and loaded one at a time.

:func:`open_source` indexes one file of any supported format, a Hugging Face style
sharded directory (``model.safetensors.index.json``) or a directory of ``.safetensors``
shards. Safetensors shards and .npz archives are indexed from their headers, PyTorch zip
checkpoints through memory-mapped storages; :meth:`Source.load` then reads only one
layer's bytes. Single-tensor formats and pre-1.6 PyTorch pickles are read whole, and
:meth:`Source.for_layer` hands a worker only its own layer's tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import FormatError, RegroupError
from .io import SUFFIXES, group_tensors, read_tensors, shape_problem, tensor_shapes
from .io.safetensors import read_safetensors, safetensors_index
from .provenance import file_sha256, tensor_bytes, update_digest

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

    def record(self) -> dict[str, str]:
        """The source as recorded in result files: the file's (or checkpoint directory's)
        name and its SHA-256 (a directory's: of its shards' hashes, in index order)."""
        where = Path(self.path)
        if where.name.endswith(".index.json"):
            where = where.parent          # the checkpoint, however it was named
        return {"name": where.name or where.resolve().name, "sha256": self.digest}

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
                update_digest(h, k, *tensor_bytes(got[k]))
        return (got.get(ref.weight) if ref.weight else None,
                got.get(ref.mask) if ref.mask else None, h.hexdigest())


def _elements(v: Any) -> int:
    shape = getattr(v, "shape", ())
    return int(np.prod(tuple(shape), dtype=object)) if shape is not None else 0


def _shape(v: Any) -> tuple[int, ...] | None:
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


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
            refs = [LayerRef(n, w, m, size=_elements(tensors[m or w]),
                             shape=_shape(tensors[m or w]))
                    for n, w, m in group_tensors(tensors)]
            return Source(str(path), refs, file_sha256(path), tensors)
        refs = [LayerRef(n, w, m, (), shape_problem(shapes[m or w]),
                         int(np.prod(shapes[m or w], dtype=object)), tuple(shapes[m or w]))
                for n, w, m in group_tensors(shapes)]
        return Source(str(path), refs, file_sha256(path))
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
                             shape_problem(shape), int(np.prod(shape, dtype=object)),
                             tuple(int(s) for s in shape)))
    if len(shards) == 1 and not path.is_dir() and not path.name.endswith(".index.json"):
        digest = file_sha256(path)
    else:  # a checkpoint directory: the hash of its shards' hashes, in index order
        h = hashlib.sha256()
        for shard in shards:
            h.update(f"{shard.name}:{file_sha256(shard)}\n".encode())
        digest = h.hexdigest()
    src = Source(str(path), refs, digest)
    src._index = indexes
    return src
