"""A small, strict reader and writer of the ``.safetensors`` format, in plain numpy.

Header: 8-byte little-endian length N, then N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section).
Every field is checked before any tensor is read, so a hostile header cannot trigger a
huge allocation; bf16 is widened to float32.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._atomic import atomic_write
from ..validation import FormatError, open_regular
from ..provenance import FileRecord, checked_record, sha256_rest, update_digest

__all__ = ["read_safetensors", "safetensors_index", "safetensors_record",
           "safetensors_metadata", "write_safetensors", "DTYPES"]

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4",
          "U64": "<u8"}
_NP_TO_ST = {np.dtype(v).str: k for k, v in DTYPES.items() if k not in ("BF16", "U16")}
_NP_TO_ST[np.dtype("<u2").str] = "U16"
MAX_HEADER = 100 * 1024 * 1024


class _Hashing:
    """A read-only view of a binary file that feeds every byte read into ``h``."""

    def __init__(self, f, h) -> None:
        self.f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def _header(f, path, size: int) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise FormatError(f"{path}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(MAX_HEADER, size - 8):
        raise FormatError(f"{path}: header length {n} exceeds the file size {size} "
                          "(truncated or not safetensors)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt safetensors header: {exc}") from None
    except RecursionError:
        raise FormatError(f"{path}: corrupt safetensors header: JSON nested too deeply") \
            from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def _int(v) -> int:
    # JSON integers only: 2.5, 1e400 (inf), true and "3" are refused, not rounded.
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(v)
    return v


def _index(f, path: str, size: int) -> dict[str, tuple]:
    header, start = _header(f, path, size)
    data_size = size - start
    out: dict[str, tuple] = {}
    for name, info in header.items():
        if name == "__metadata__":      # the format's: a map of strings to strings
            _check_metadata(info, path)
            continue
        try:
            dtype = info["dtype"]
            shape = [_int(s) for s in info["shape"]]
            begin, end = (_int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has an invalid header entry") \
                from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                              f"(supported: {', '.join(DTYPES)})")
        if any(s < 0 for s in shape):
            raise FormatError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        npd = np.dtype(DTYPES[dtype])
        count = int(np.prod(shape, dtype=object))
        if not 0 <= begin <= end <= data_size or end - begin != count * npd.itemsize:
            raise FormatError(f"{path}: tensor {name!r} (dtype {dtype}, shape {shape}) "
                              f"has data offsets [{begin}, {end}] inconsistent with the "
                              f"file ({data_size} data bytes)")
        out[name] = (dtype, tuple(shape), start + begin, start + end)
    return out


def safetensors_index(path: str | os.PathLike) -> tuple[dict[str, tuple], int]:
    """The validated header of a ``.safetensors`` file, without reading any tensor:
    ``{name: (dtype, shape, begin, end)}`` (file order; offsets absolute) and the file size.
    Anything but a regular file is refused before it is opened.
    """
    path = os.fspath(path)
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        return _index(f, path, size), size


def safetensors_record(path: str | os.PathLike) -> tuple[dict[str, tuple], FileRecord]:
    """:func:`safetensors_index` and the file's :class:`~regroup.provenance.FileRecord`
    (its SHA-256 included) from one pass through one handle: the header hashed as it is
    parsed, then the data."""
    path = os.fspath(path)
    with open_regular(path, "safetensors file") as f:
        before = os.fstat(f.fileno())
        h = hashlib.sha256()
        index = _index(_Hashing(f, h), path, before.st_size)
        return index, checked_record(f, path, before, sha256_rest(f, h).hexdigest())


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header ({} when absent), checked
    to map strings to strings as the format requires."""
    path = os.fspath(path)
    with open_regular(path, "safetensors file") as f:
        header, _ = _header(f, path, os.fstat(f.fileno()).st_size)
    return _check_metadata(header.get("__metadata__", {}), path)


def _check_metadata(meta: Any, path: str) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise FormatError(f"{path}: the header's __metadata__ must map strings to strings")
    return meta


def read_safetensors(path: str | os.PathLike, names=None, *,
                     index: dict[str, tuple] | None = None,
                     digest=None) -> dict[str, np.ndarray]:
    """Read tensors of a ``.safetensors`` file into numpy arrays: all of them (in header
    order), or only ``names`` (one layer at a time for large checkpoints; in data order,
    looked up by name, so reading every layer of a file is linear in its tensor count).
    Names the file lacks are left out. ``digest`` (a hashlib object) is updated with each
    tensor's name, header and bytes."""
    path = os.fspath(path)
    if index is None:
        index, _ = safetensors_index(path)
    if names is None:
        wanted = list(index)
    else:
        wanted = sorted({n for n in names if n in index},
                        key=lambda n: (index[n][2], index[n][3], n))
    out: dict[str, np.ndarray] = {}
    with open_regular(path, "safetensors file") as f:
        for name in wanted:
            dtype, shape, begin, end = index[name]
            f.seek(begin)
            raw = f.read(end - begin)
            if len(raw) != end - begin:
                raise FormatError(f"{path}: tensor {name!r} is cut short (the file changed "
                                  "since it was indexed - run again)")
            if digest is not None:
                update_digest(digest, name, dtype, shape, raw)
            arr = np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype])).reshape(shape)
            if dtype == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            out[name] = arr
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays as ``.safetensors`` (atomically; names sorted, 8-byte aligned)."""
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)   # keeps 0-d arrays 0-d
        key = arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == ">" else arr.dtype.str
        if arr.dtype == np.bool_:
            key = "|b1"
        st = "BOOL" if arr.dtype == np.bool_ else _NP_TO_ST.get(key)
        if st is None:
            raise TypeError(f"write_safetensors cannot store dtype {arr.dtype} ({name!r})")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
