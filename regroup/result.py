"""Result files: the layouts of one run, stored so they are never recomputed.

A result file is a zip archive (``.npz`` compatible) written deterministically: fixed entry
order and timestamps, so the same input and seed give byte-identical files. Wall-clock
times are not stored (they live in the JSON report).

Layout of the archive (format version 1)::

    meta.json                 format_version, regroup and tool versions, run options,
                              and per layer: name, shape, block_shape, format, method,
                              params, seed, metrics, array entry prefix (and nm: [N, M]
                              for format "nm")
    layers/<i>/mask.npy       bool, the refilled mask in ORIGINAL coordinates and shape
    layers/<i>/row_perm.npy   intp (grid, shuffled), row_perm[i] = original row at
                              regrouped position i
    layers/<i>/col_perm.npy   intp (grid, nm), col_perm[j] = original column at position j
    layers/<i>/panel_ptr.npy  intp (shuffled), panel p's kept columns are
    layers/<i>/panel_cols.npy   panel_cols[panel_ptr[p]:panel_ptr[p+1]], tile after tile

An N:M layer (format "nm") stores no row_perm (N:M keeps rows in place: it reads as the
identity), block_shape [1, M], and a mask in which every row keeps at most N of each
group of M columns permuted by col_perm (N exactly, as written by regroup).

Reading trusts nothing in the file. Before anything is allocated, the archive's directory,
entry count, meta.json and every array's declared size and npy header are checked against
limits (:data:`MAX_META_BYTES`, :data:`MAX_LAYERS`, :data:`MAX_ENTRIES`, ...) and against
the sizes the layer records imply (a mask of shape (r, c) is r*c bytes of bool); a
declared size is only a claim, so entries are inflated a bounded chunk at a time and never
past it. The content is then validated: shapes, permutations that are bijections, sane
panel pointers, masks that are exactly the union of their layout's blocks or, for N:M,
keep at most N per group of M permuted columns (checked a few rows at a time,
vectorised), kept-block counts and kept areas that agree with the metrics, and no entry
but meta.json and the layers' arrays. Any failure is a :class:`~regroup.FormatError`
naming the file and the layer.

The one-layer *parts* of a streamed run (:func:`save_part`, :func:`load_part`) are result
files sealed with the SHA-256 of their bytes (see :mod:`regroup._zip`): a part changed
since it was written is recomputed or refused, never copied into a result.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from ._atomic import atomic_write
from .validation import FormatError, open_regular
from ._zip import ZipWriter, check_seal, directory_size, raw_entry
from .blocks import positions
from .nm import check_nm
from .options import LAYOUT_FORMATS

__all__ = ["LayerResult", "save_result", "load_result", "check_result", "layer_record",
           "assemble_result", "read_meta", "save_part", "load_part", "damaged_part",
           "FORMAT_VERSION", "MAX_LAYERS", "MAX_ENTRIES", "MAX_META_BYTES",
           "MAX_DIRECTORY_BYTES", "MAX_NPY_HEADER", "MAX_LAYER_ELEMENTS", "MAX_COLUMNS"]

FORMAT_VERSION = 1

# -- limits on what a result file may claim (checked before anything is allocated) ---------
#: Layers in one result file. (A layer record takes ~1.4 KB of meta.json.)
MAX_LAYERS = 32_768
#: Bytes of meta.json. Parsing JSON costs up to ~25x its size in Python objects (an array
#: of empty objects), so this also bounds the memory of reading a hostile meta.json.
MAX_META_BYTES = 32 << 20
#: Zip entries: meta.json and at most five arrays per layer.
MAX_ENTRIES = 1 + 5 * MAX_LAYERS
#: Bytes of the zip central directory (``zipfile`` holds it all in memory).
MAX_DIRECTORY_BYTES = 256 * MAX_ENTRIES
#: Bytes of an npy header (regroup writes ~128).
MAX_NPY_HEADER = 4096
#: Elements of one layer's mask (rows x columns of its matrix).
MAX_LAYER_ELEMENTS = 1 << 36
#: Columns of one layer's matrix (a row is the unit a mask is checked by).
MAX_COLUMNS = 1 << 24

_READ_CHUNK = 1 << 22      # bytes inflated at a time
_CHECK_BYTES = 1 << 22     # bytes of mask rows checked at a time
_DEFLATE_RATIO = 1032      # deflate cannot expand data more than ~1032-fold
_DTYPES = {"mask": np.dtype(bool), "perm": np.dtype("<i8")}


@dataclass(frozen=True, eq=False)
class LayerResult:
    """The regrouped block layout of one layer.

    Attributes
    ----------
    name : str
    shape : tuple of int
        Original tensor shape (2-D or 4-D); ``mask`` has this shape.
    mask : ndarray of bool
        Refilled mask in original coordinates: True inside kept blocks, False elsewhere.
    row_perm : ndarray of intp
        ``row_perm[i]`` is the original (flattened) row at regrouped position ``i``
        (the identity for "nm").
    col_perm : ndarray of intp or None
        Grid and nm formats: ``col_perm[j]`` is the original column at regrouped
        position ``j``.
    panel_cols : tuple of ndarray of intp, or None
        Shuffled format: the original columns kept by each row panel, tile after tile.
    block_shape : (int, int)
        ``(1, M)`` for "nm".
    format : {"grid", "shuffled", "nm"}
    method : str
        The method asked for (e.g. ``"auto"``); ``metrics["chosen"]`` names the winner.
    params : dict
    seed : int
    metrics : dict
        See :mod:`regroup.metrics`.
    seconds : float or None
        Wall-clock time of the layer (not stored in result files).
    nm : (int, int) or None
        ``(N, M)`` of format "nm": each row keeps N of every M columns of
        ``mask2d[:, col_perm]``.
    """

    name: str
    shape: tuple[int, ...]
    mask: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray | None
    panel_cols: tuple[np.ndarray, ...] | None
    block_shape: tuple[int, int]
    format: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    nm: tuple[int, int] | None = None

    @property
    def mask2d(self) -> np.ndarray:
        """The mask flattened to the regrouped matrix's (rows, cols) orientation."""
        return self.mask.reshape(self.shape[0], -1)

    def regrouped_mask(self) -> np.ndarray:
        """The mask in regrouped coordinates: ``mask2d[row_perm][:, col_perm]`` (grid, nm:
        there the N:M groups are consecutive columns) or rows permuted only (shuffled)."""
        m = self.mask2d[self.row_perm]
        return m[:, self.col_perm] if self.col_perm is not None else m


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def layer_record(r: LayerResult, prefix: str = "") -> dict:
    """The JSON record of one layer in a result file's meta.json (``prefix``: its array
    entries' directory)."""
    nm = {} if r.nm is None else {"nm": list(r.nm)}
    return {"name": r.name, "shape": list(r.shape), "block_shape": list(r.block_shape),
            "format": r.format, **nm, "method": r.method, "params": r.params,
            "seed": r.seed, "metrics": r.metrics, "entry": prefix}


def save_result(path: str | os.PathLike, layers: list[LayerResult],
                meta: Mapping[str, Any] | None = None) -> None:
    """Write ``layers`` to ``path`` atomically (temporary file, then rename).

    ``meta`` is stored as run information (options, tool versions, skipped layers).
    """
    _save(path, layers, meta, seal=False)


def save_part(path: str | os.PathLike, layers: list[LayerResult],
              meta: Mapping[str, Any] | None = None) -> None:
    """:func:`save_result`, sealed with the SHA-256 of the file's bytes: the one-layer part
    of a streamed run, read back by :func:`load_part` and :func:`assemble_result`."""
    _save(path, layers, meta, seal=True)


def _save(path: str | os.PathLike, layers: list[LayerResult],
          meta: Mapping[str, Any] | None, *, seal: bool) -> None:
    doc = {**(meta or {}), "format_version": FORMAT_VERSION,
           "layers": [layer_record(r, f"layers/{i}/") for i, r in enumerate(layers)]}
    with atomic_write(path, "wb") as f, ZipWriter(f, seal=seal) as zw:
        zw.write("meta.json", json.dumps(doc, indent=1, sort_keys=True).encode())
        for i, r in enumerate(layers):
            pre = f"layers/{i}/"
            zw.write(pre + "mask.npy", _npy_bytes(np.asarray(r.mask, dtype=bool)))
            if "row_perm.npy" in _ENTRIES[r.format]:
                zw.write(pre + "row_perm.npy", _npy_bytes(r.row_perm.astype(np.int64)))
            if r.col_perm is not None:
                zw.write(pre + "col_perm.npy", _npy_bytes(r.col_perm.astype(np.int64)))
            if r.panel_cols is not None:
                ptr = np.concatenate([[0], np.cumsum([c.size for c in r.panel_cols])])
                cols = (np.concatenate(r.panel_cols) if r.panel_cols else
                        np.zeros(0, np.int64))
                zw.write(pre + "panel_ptr.npy", _npy_bytes(ptr.astype(np.int64)))
                zw.write(pre + "panel_cols.npy", _npy_bytes(cols.astype(np.int64)))


class ResultFile(dict):
    """Mapping of layer name to :class:`LayerResult`, with the run information in ``meta``."""

    meta: dict


def damaged_part(part, layer: str, why: Exception | str) -> FormatError:
    """The error for a one-layer part file that cannot be read back."""
    return FormatError(f"{part}: the finished part of layer {layer!r} is damaged ({why}); "
                       "delete it and run again to recompute that layer")


# -- reading under limits --------------------------------------------------------------------
# What zipfile, zlib and numpy raise on malformed input (FormatError, a ValueError, is
# re-raised as it is before these are caught).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
               RuntimeError, NotImplementedError, struct.error, zlib.error)
# The array entries of a layer, in the order save_result writes them.
_ENTRIES = {"grid": ("mask.npy", "row_perm.npy", "col_perm.npy"),
            "shuffled": ("mask.npy", "row_perm.npy", "panel_ptr.npy", "panel_cols.npy"),
            "nm": ("mask.npy", "col_perm.npy")}


def _short(value: Any) -> str:
    """``repr(value)``, cut short (a hostile value may be megabytes long)."""
    return reprlib.repr(value)


def _memory_limit() -> int:
    """Bytes this process may allocate at most: physical memory, or the address-space limit
    (``ulimit -v``) when lower."""
    limit = 1 << 62
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource
    except ImportError:         # not on Windows
        return limit
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return limit if soft == resource.RLIM_INFINITY else min(limit, soft)


class _Memory:
    """The bytes of arrays a read holds, against :func:`_memory_limit`: a file claiming more
    than can be allocated is refused before its arrays are read."""

    def __init__(self) -> None:
        self.limit = _memory_limit()
        self.held = 0

    def take(self, nbytes: int, where: str, what: str) -> None:
        self.held += nbytes
        if self.held > self.limit:
            raise FormatError(f"{where}: {what} needs {nbytes} bytes ({self.held} with what "
                              f"is held before it), more than the {self.limit} bytes this "
                              "process may allocate")

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype, where: str,
              what: str) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        self.take(nbytes, where, what)
        try:
            return np.empty(shape, dtype)
        except MemoryError:
            raise FormatError(f"{where}: {what} needs {nbytes} bytes, which cannot be "
                              "allocated") from None


@contextlib.contextmanager
def _reading(where: str, name: str) -> Iterator[None]:
    """Turn what a damaged entry makes zipfile, zlib or numpy raise into a FormatError."""
    try:
        yield
    except FormatError:
        raise
    except _ZIP_ERRORS as exc:
        raise FormatError(f"{where}: entry {name!r} is damaged ({type(exc).__name__}: "
                          f"{exc})") from None


class _Archive:
    """A zip archive open for reading, its directory checked against the limits."""

    def __init__(self, fp: BinaryIO, path: str) -> None:
        self.path = path
        try:
            # zipfile reads and parses the whole central directory: bound it first.
            cd = directory_size(fp)
            if cd is not None and cd > MAX_DIRECTORY_BYTES:
                raise FormatError(f"{path}: its zip directory declares {cd} bytes, more than "
                                  f"a result file has ({MAX_DIRECTORY_BYTES})")
            self.zf = zipfile.ZipFile(fp)
        except FormatError:
            raise
        except _ZIP_ERRORS as exc:
            raise FormatError(f"{path}: not a regroup result file (not a zip archive: "
                              f"{exc})") from None
        infos = self.zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise FormatError(f"{path}: {len(infos)} zip entries, more than a result file "
                              f"has ({MAX_ENTRIES})")
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.infos:
                raise FormatError(f"{path}: zip entry {info.filename!r} appears twice")
            self.infos[info.filename] = info

    def open(self, name: str, where: str, limit: int):
        """The entry ``name`` open for reading, once its declared size (at most ``limit``)
        and compression have been checked. The stream never yields more than the declared
        size and checks the CRC at its end."""
        info = self.infos.get(name)
        if info is None:
            raise FormatError(f"{where}: entry {name!r} is missing")
        if info.file_size > limit:
            raise FormatError(f"{where}: entry {name!r} declares {info.file_size} bytes, "
                              f"expected at most {limit}")
        if info.flag_bits & 0x1:
            raise FormatError(f"{where}: entry {name!r} is encrypted")
        if info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > _DEFLATE_RATIO * info.compress_size + 64:
                raise FormatError(f"{where}: entry {name!r} declares {info.file_size} bytes, "
                                  f"more than its {info.compress_size} deflated bytes hold")
        elif info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise FormatError(f"{where}: entry {name!r} uses compression method "
                              f"{info.compress_type}, not deflate")
        with _reading(where, name):
            return self.zf.open(info)

    def read_bytes(self, name: str, where: str, limit: int) -> bytes:
        with _reading(where, name), self.open(name, where, limit) as f:
            return f.read(limit + 1)


def _open_npy(arc: _Archive, name: str, where: str, dtype: np.dtype,
              shape: tuple[int, ...]):
    """The npy entry ``name`` open at its data, once its header has been read (at most
    :data:`MAX_NPY_HEADER` bytes) and found to hold exactly ``dtype`` (a plain one:
    structured and object dtypes never match) and ``shape`` in C order, and its declared
    size to be exactly header plus data."""
    nbytes = math.prod(shape) * dtype.itemsize
    f = arc.open(name, where, nbytes + 12 + MAX_NPY_HEADER)
    try:
        with _reading(where, name):
            magic = f.read(8)
            if magic[:6] != b"\x93NUMPY" or magic[6:] not in (b"\x01\x00", b"\x02\x00"):
                raise FormatError(f"{where}: entry {name!r} is not an npy array (format "
                                  "1.0 or 2.0)")
            size_field = f.read(2 if magic[6] == 1 else 4)
            hlen = int.from_bytes(size_field, "little")
            if hlen > MAX_NPY_HEADER:
                raise FormatError(f"{where}: entry {name!r} has an npy header of {hlen} "
                                  f"bytes, at most {MAX_NPY_HEADER} expected")
            header = f.read(hlen)
            if len(header) != hlen:
                raise FormatError(f"{where}: entry {name!r} ends inside its npy header")
            buf = io.BytesIO(magic + size_field + header)
            read = (np.lib.format.read_array_header_1_0 if magic[6] == 1
                    else np.lib.format.read_array_header_2_0)
            try:
                np.lib.format.read_magic(buf)
                got_shape, fortran, got = read(buf, max_header_size=MAX_NPY_HEADER + 1)
            except (ValueError, TypeError, SyntaxError, KeyError, RecursionError,
                    MemoryError, OverflowError) as exc:
                raise FormatError(f"{where}: entry {name!r} has a bad npy header "
                                  f"({type(exc).__name__}: {exc})") from None
            if got.str != dtype.str or got.names is not None or got.subdtype is not None:
                shown = got.str if got.names is None else _short(got.descr)
                raise FormatError(f"{where}: entry {name!r} holds dtype {shown}, expected "
                                  f"{dtype.str}")
            if fortran or tuple(got_shape) != shape:
                raise FormatError(f"{where}: entry {name!r} has shape {_short(got_shape)}"
                                  f"{' (Fortran order)' if fortran else ''}, expected "
                                  f"{shape}")
            declared = arc.infos[name].file_size
            if declared != len(buf.getvalue()) + nbytes:
                raise FormatError(f"{where}: entry {name!r} declares {declared} bytes, "
                                  f"expected {len(buf.getvalue()) + nbytes} for its shape")
        return f
    except BaseException:
        f.close()
        raise


def _fill(f, out: np.ndarray, where: str, name: str) -> None:
    """Read exactly ``out.nbytes`` bytes of ``f`` into ``out`` (C-contiguous), a bounded
    chunk at a time."""
    flat = out.reshape(-1).view(np.uint8)
    pos = 0
    while pos < flat.size:
        data = f.read(min(_READ_CHUNK, flat.size - pos))
        if not data:
            raise FormatError(f"{where}: entry {name!r} ends after {pos} of {flat.size} "
                              "data bytes")
        flat[pos:pos + len(data)] = np.frombuffer(data, np.uint8)
        pos += len(data)


def _end(f, where: str, name: str) -> None:
    if f.read(1):       # (zipfile stops at the declared size; this reads to its CRC check)
        raise FormatError(f"{where}: entry {name!r} holds more than its data")


def _read_array(arc: _Archive, name: str, where: str, shape: tuple[int, ...],
                memory: _Memory) -> np.ndarray:
    dtype = _DTYPES["perm"]
    out = memory.alloc(shape, dtype, where, f"entry {name!r}")
    with _open_npy(arc, name, where, dtype, shape) as f, _reading(where, name):
        _fill(f, out, where, name)
        _end(f, where, name)
    return out


# -- validation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Record:
    """A layer record of meta.json, checked."""

    doc: dict
    name: str
    shape: tuple[int, ...]
    n: int
    m: int
    block: tuple[int, int]
    format: str
    entry: str
    nm: tuple[int, int] | None = None


def _ints(value: Any, lengths: tuple[int, ...]) -> bool:
    """Whether ``value`` is a list of ``lengths`` integers in 1 .. 2**31 - 1."""
    return (isinstance(value, list) and len(value) in lengths
            and all(type(v) is int and 0 < v < 1 << 31 for v in value))


def _layer_record(lm: Any, i: int, path: str) -> _Record:
    where = f"{path}: layer {i}"
    if not isinstance(lm, dict):
        raise FormatError(f"{where}: its record is a {type(lm).__name__}, not an object")
    name = lm.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: its name is {_short(name)}, not a non-empty string")
    where = f"{path}: layer {name!r}"
    shape, block = lm.get("shape"), lm.get("block_shape")
    if not _ints(shape, (2, 4)):
        raise FormatError(f"{where}: shape {_short(shape)}, expected 2 or 4 positive "
                          "integers")
    n, m = shape[0], math.prod(shape[1:])
    if m > MAX_COLUMNS or n * m > MAX_LAYER_ELEMENTS:
        raise FormatError(f"{where}: shape {shape} is larger than a layer may be ({n} x {m} "
                          f"matrix; at most {MAX_COLUMNS} columns and {MAX_LAYER_ELEMENTS} "
                          "elements)")
    if not _ints(block, (2,)):
        raise FormatError(f"{where}: block_shape {_short(block)}, expected 2 positive "
                          "integers")
    fmt = lm.get("format")
    if fmt not in LAYOUT_FORMATS:
        raise FormatError(f"{where}: format {_short(fmt)}, expected one of "
                          f"{LAYOUT_FORMATS}")
    nm = None
    if fmt == "nm":
        raw = lm.get("nm")
        if not _ints(raw, (2,)):
            raise FormatError(f"{where}: nm {_short(raw)}, expected [N, M] (format 'nm')")
        try:
            nm = check_nm(raw, "")
        except (TypeError, ValueError):
            raise FormatError(f"{where}: nm {raw}, expected [N, M] with 1 <= N < M <= "
                              "64") from None
        if block != [1, nm[1]]:
            raise FormatError(f"{where}: block_shape {block}, expected [1, {nm[1]}] for "
                              f"N:M {nm[0]}:{nm[1]}")
        if m % nm[1]:
            raise FormatError(f"{where}: shape {shape} has {m} columns, not a multiple of "
                              f"M = {nm[1]}")
    elif "nm" in lm:
        raise FormatError(f"{where}: nm {_short(lm['nm'])} in a {fmt!r} layer (N:M is "
                          "format 'nm' only)")
    for key, kind in (("method", str), ("params", dict), ("metrics", dict)):
        if not isinstance(lm.get(key), kind):
            raise FormatError(f"{where}: {key} {_short(lm.get(key))}, expected a "
                              f"{kind.__name__}")
    if type(lm.get("seed")) is not int:
        raise FormatError(f"{where}: seed {_short(lm.get('seed'))}, expected an integer")
    metrics = lm["metrics"]
    for key in ("kept_blocks", "kept_area"):
        if metrics.get(key) is not None and (type(metrics[key]) is not int or metrics[key] < 0):
            raise FormatError(f"{where}: metrics {key} {_short(metrics[key])}, expected a "
                              "count")
    if metrics.get("retained") is not None and type(metrics["retained"]) not in (int, float):
        raise FormatError(f"{where}: metrics retained {_short(metrics['retained'])}, expected "
                          "a number")
    if lm.get("entry") != f"layers/{i}/":
        raise FormatError(f"{where}: entry {_short(lm.get('entry'))}, expected 'layers/{i}/'")
    return _Record(lm, name, tuple(shape), n, m, tuple(block), fmt, f"layers/{i}/", nm)


def _read_doc(arc: _Archive, path: str) -> tuple[dict, list[_Record]]:
    """meta.json, read and checked: the run information and every layer record."""
    if "meta.json" not in arc.infos:
        raise FormatError(f"{path}: not a regroup result file (no meta.json)")
    data = arc.read_bytes("meta.json", path, MAX_META_BYTES)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:    # (bad JSON, bad UTF-8, deep nesting)
        raise FormatError(f"{path}: corrupt meta.json: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: corrupt meta.json: a {type(doc).__name__}, not an object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: result format version {_short(version)} is not supported "
                          f"(this regroup reads version {FORMAT_VERSION})")
    for key, kind in (("layers", list), ("options", dict), ("versions", dict),
                      ("source", dict), ("skipped", list)):
        if (key in doc or key == "layers") and not isinstance(doc.get(key), kind):
            raise FormatError(f"{path}: meta.json {key!r} is {_short(doc.get(key))}, expected "
                              f"a {kind.__name__}")
    layers = doc["layers"]
    if len(layers) > MAX_LAYERS:
        raise FormatError(f"{path}: {len(layers)} layers, more than a result file may hold "
                          f"({MAX_LAYERS})")
    for s in doc.get("skipped", []):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str)
                and isinstance(s.get("reason"), (str, type(None)))):
            raise FormatError(f"{path}: meta.json 'skipped' holds {_short(s)}, expected "
                              "{'name': str, 'reason': str}")
    records, names = [], set()
    for i, lm in enumerate(layers):
        rec = _layer_record(lm, i, path)
        if rec.name in names:
            raise FormatError(f"{path}: layer {rec.name!r} appears twice")
        names.add(rec.name)
        records.append(rec)
    return doc, records


def _check_perm(perm: np.ndarray, n: int, what: str, where: str) -> None:
    """``perm`` (length ``n``) must be a bijection of 0 .. n-1."""
    if n and (perm.min() < 0 or perm.max() >= n):
        raise FormatError(f"{where}: {what} holds values outside 0..{n - 1} (got "
                          f"{perm.min()}..{perm.max()})")
    seen = np.zeros(n, bool)
    seen[perm] = True
    if not seen.all():
        raise FormatError(f"{where}: {what} is not a permutation of 0..{n - 1} (it repeats "
                          f"values; {int(np.argmin(seen))} is missing)")


def _check_panels(ptr: np.ndarray, cols: np.ndarray | None, m: int, bc: int,
                  where: str) -> None:
    """``panel_ptr`` (and, once read, ``panel_cols``): each panel keeps distinct columns in
    range, whole tiles of ``bc`` (the last one short when ``m % bc``)."""
    sizes = np.diff(ptr)
    if ptr[0] != 0 or np.any(sizes < 0) or np.any(sizes > m):
        raise FormatError(f"{where}: panel_ptr must rise from 0 by 0..{m} per panel (got "
                          f"{ptr[0]}..{ptr[-1]}, steps {sizes.min(initial=0)}.."
                          f"{sizes.max(initial=0)})")
    rest = sizes % bc
    bad = (rest != 0) & (rest != m % bc)
    if bad.any():
        p = int(np.argmax(bad))
        raise FormatError(f"{where}: panel {p} keeps {sizes[p]} columns, not whole tiles of "
                          f"{bc} (of {m} columns)")
    if cols is None:
        return
    if cols.size and (cols.min() < 0 or cols.max() >= m):
        raise FormatError(f"{where}: panel_cols holds columns outside 0..{m - 1} (got "
                          f"{cols.min()}..{cols.max()})")
    key = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes) * m + cols
    key.sort()
    dup = np.flatnonzero(key[1:] == key[:-1])
    if dup.size:
        p, c = divmod(int(key[dup[0]]), m)
        raise FormatError(f"{where}: panel {p} lists column {c} twice")


class _MaskCheck:
    """Checks a mask, a few rows at a time in file order, to be exactly the union of its
    layout's kept blocks; counts them and their area on the way."""

    def __init__(self, rec: _Record, row_perm: np.ndarray, col_perm: np.ndarray | None,
                 ptr: np.ndarray | None, cols: np.ndarray | None, where: str) -> None:
        br, bc = rec.block
        self.where, self.bc, self.m = where, bc, rec.m
        self.panel = positions(row_perm) // br        # each original row's panel
        self.area = 0
        self.grid = rec.format == "grid"
        self.nm = rec.nm
        if self.nm is not None:
            self.col_perm = col_perm
        elif self.grid:
            self.col_perm = col_perm
            # Each regrouped column's group's first column, and the groups' first columns.
            self.first = np.arange(rec.m) // bc * bc
            self.heads = np.arange(0, rec.m, bc)
            self.kept = np.zeros((-(-rec.n // br), self.heads.size), bool)
            self.seen = np.zeros(self.kept.shape[0], bool)
        else:
            self.ptr, self.cols = ptr, cols

    def _fail(self, bad: np.ndarray, start: int, why: str) -> FormatError:
        r = start + int(np.argmax(bad))
        if self.nm is not None:
            return FormatError(f"{self.where}: the mask is not {self.nm[0]}:{self.nm[1]} "
                               f"after col_perm (row {r}: {why})")
        return FormatError(f"{self.where}: the mask is not the union of its layout's blocks "
                           f"(row {r}, panel {self.panel[r]}: {why})")

    def feed(self, rows: np.ndarray, start: int) -> None:
        """Check ``rows`` (2-D), the mask's rows ``start`` onwards."""
        self.area += int(np.count_nonzero(rows))
        if self.nm is not None:
            n, m = self.nm
            kept = np.count_nonzero(rows[:, self.col_perm].reshape(rows.shape[0], -1, m),
                                    axis=-1)
            bad = (kept > n).any(axis=1)
            if bad.any():
                raise self._fail(bad, start, f"more than {n} kept in a group of {m} "
                                 "permuted columns")
            return
        pan = self.panel[start:start + rows.shape[0]]
        if self.grid:
            R = rows[:, self.col_perm]
            bad = (R != R[:, self.first]).any(axis=1)
            if bad.any():
                raise self._fail(bad, start, f"not constant over blocks of {self.bc} columns")
            H = R[:, self.heads]
            new = ~self.seen[pan]
            self.kept[pan[new]] = H[new]
            self.seen[pan] = True
            bad = (H != self.kept[pan]).any(axis=1)
            if bad.any():
                raise self._fail(bad, start, "differs from another row of its panel")
            return
        # Shuffled: each row must equal the indicator of its panel's kept columns.
        up, inv = np.unique(pan, return_inverse=True)
        sizes = self.ptr[up + 1] - self.ptr[up]
        at = np.repeat(self.ptr[up] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
        expect = np.zeros((up.size, self.m), bool)
        expect[np.repeat(np.arange(up.size), sizes), self.cols[at]] = True
        bad = (rows != expect[inv]).any(axis=1)
        if bad.any():
            raise self._fail(bad, start, "differs from its panel's kept columns")

    def finish(self, metrics: dict) -> None:
        """Compare the blocks and area found with what the metrics say (when they say)."""
        if self.nm is not None:
            blocks = None      # N:M keeps groups' entries, not blocks
        elif self.grid:
            blocks = int(self.kept.sum())
        else:
            blocks = int((-(-np.diff(self.ptr) // self.bc)).sum())
        for key, got in (("kept_blocks", blocks), ("kept_area", self.area)):
            if got is not None and metrics.get(key) is not None and metrics[key] != got:
                raise FormatError(f"{self.where}: its metrics say {key} {metrics[key]}, its "
                                  f"mask holds {got}")


def _read_layer(arc: _Archive, rec: _Record, path: str, memory: _Memory,
                keep: bool) -> LayerResult | None:
    """Read and check one layer's arrays; its LayerResult when ``keep``, else None (the
    mask is then checked through a few rows of scratch space and not kept)."""
    where = f"{path}: layer {rec.name!r}"
    n, m, (br, bc) = rec.n, rec.m, rec.block
    if rec.format == "nm":          # N:M keeps rows in place: no row_perm is stored
        row_perm = memory.alloc((n,), _DTYPES["perm"], where, "its row order")
        row_perm[:] = np.arange(n)
    else:
        row_perm = _read_array(arc, rec.entry + "row_perm.npy", where, (n,), memory)
        _check_perm(row_perm, n, "row_perm", where)
    col_perm = ptr = cols = None
    if rec.format in ("grid", "nm"):
        col_perm = _read_array(arc, rec.entry + "col_perm.npy", where, (m,), memory)
        _check_perm(col_perm, m, "col_perm", where)
    else:
        ptr = _read_array(arc, rec.entry + "panel_ptr.npy", where, (-(-n // br) + 1,), memory)
        _check_panels(ptr, None, m, bc, where)
        cols = _read_array(arc, rec.entry + "panel_cols.npy", where, (int(ptr[-1]),), memory)
        _check_panels(ptr, cols, m, bc, where)
    check = _MaskCheck(rec, row_perm, col_perm, ptr, cols, where)
    name, dtype = rec.entry + "mask.npy", _DTYPES["mask"]
    step = max(1, _CHECK_BYTES // m)               # rows checked at a time
    if keep:
        mask = memory.alloc(rec.shape, dtype, where, "its mask")
        flat = mask.reshape(n, m)
    else:
        mask, flat = None, memory.alloc((min(step, n), m), dtype, where, "checking its mask")
    with _open_npy(arc, name, where, dtype, rec.shape) as f, _reading(where, name):
        for a in range(0, n, step):
            rows = flat[a:a + step] if keep else flat[:min(step, n - a)]
            _fill(f, rows, where, name)
            check.feed(rows, a)
        _end(f, where, name)
    check.finish(rec.doc["metrics"])
    if not keep:
        return None
    lm = rec.doc
    panel_cols = None if ptr is None else tuple(
        cols[a:b].astype(np.intp) for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist()))
    return LayerResult(
        name=rec.name, shape=rec.shape, mask=mask, row_perm=row_perm.astype(np.intp),
        col_perm=None if col_perm is None else col_perm.astype(np.intp),
        panel_cols=panel_cols, block_shape=rec.block, format=rec.format,
        method=lm["method"], params=lm["params"], seed=lm["seed"], metrics=lm["metrics"],
        nm=rec.nm)


def _read(fp: BinaryIO, path: str, *, keep: bool) -> tuple[dict, ResultFile]:
    """Read and check the result file open as ``fp``: its meta.json and, layer after
    layer, its arrays (kept in the returned ResultFile when ``keep``). The archive must
    hold nothing but meta.json and the layers' arrays: regroup writes nothing else, and
    an entry it did not write (``../x``, a second copy) is a file edited since."""
    arc = _Archive(fp, path)
    doc, records = _read_doc(arc, path)
    expected = {"meta.json"} | {r.entry + e for r in records for e in _ENTRIES[r.format]}
    extra = sorted(set(arc.infos) - expected)
    if extra:
        raise FormatError(f"{path}: unexpected zip entries {_short(extra)}")
    memory = _Memory()
    if keep:    # what every layer will hold, before any of it is read
        for rec in records:
            memory.take(rec.n * rec.m + 8 * rec.n + 8 * (
                rec.m if rec.format in ("grid", "nm") else -(-rec.n // rec.block[0]) + 1),
                f"{path}: layer {rec.name!r}", "its mask and orders")
        memory.held = 0
    out = ResultFile()
    for rec in records:
        if not keep:
            memory.held = 0
        r = _read_layer(arc, rec, path, memory, keep)
        if keep:
            out[rec.name] = r
    out.meta = {k: v for k, v in doc.items() if k != "layers"}
    return doc, out


# -- public readers ----------------------------------------------------------------------------
def read_meta(path: str | os.PathLike) -> dict | None:
    """The meta.json of a result file (read under the limits, not checked), or None when it
    cannot be read."""
    path = os.fspath(path)
    try:
        with open_regular(path, "result file") as fp:
            data = _Archive(fp, path).read_bytes("meta.json", path, MAX_META_BYTES)
        doc = json.loads(data)
    except (OSError, ValueError, RecursionError):    # (FormatError is a ValueError)
        return None
    return doc if isinstance(doc, dict) else None


def load_result(path: str | os.PathLike) -> ResultFile:
    """Load a result file written by :func:`save_result` (or ``regroup run``), checking all
    of it (see the module documentation).

    Returns
    -------
    ResultFile
        A dict from layer name to :class:`LayerResult`; ``.meta`` holds the run information.

    Raises
    ------
    FileNotFoundError, FormatError
    """
    path = os.fspath(path)
    with open_regular(path, "result file") as fp:
        return _read(fp, path, keep=True)[1]


def check_result(path: str | os.PathLike) -> dict:
    """Check a result file as :func:`load_result` does, holding one layer's orders and a
    few mask rows at a time; returns its meta.json (``"layers"``: the layer records).

    Raises
    ------
    FileNotFoundError, FormatError
    """
    path = os.fspath(path)
    with open_regular(path, "result file") as fp:
        return _read(fp, path, keep=False)[0]


def _check_part_doc(doc: dict, path: str, layer: str) -> None:
    """A part must hold exactly the finished layer ``layer``."""
    status = doc.get("status")
    if status != "done":
        raise FormatError(f"{path}: layer {layer!r}: status {_short(status)}, expected 'done'")
    names = [lm["name"] for lm in doc["layers"]]
    if names != [layer]:
        raise FormatError(f"{path}: holds layers {_short(names)}, expected only {layer!r}")
    seconds = doc.get("seconds")
    if seconds is not None and not (type(seconds) in (int, float) and
                                    0 <= seconds < math.inf):
        raise FormatError(f"{path}: layer {layer!r}: seconds {_short(seconds)}, expected a "
                          "finite number")


def load_part(path: str | os.PathLike, layer: str) -> tuple[dict, LayerResult]:
    """Read the part of a streamed run holding the finished layer ``layer``: its seal
    (the SHA-256 of its bytes) must match, it must pass every check of
    :func:`load_result`, hold only ``layer`` and nothing else. Returns its run
    information (the input hash and options key it was made from) and the layer.

    Raises
    ------
    OSError, FormatError
    """
    path = os.fspath(path)
    with open_regular(path, "result file") as fp:
        try:
            check_seal(fp)
        except FormatError as exc:
            raise FormatError(f"{path}: layer {layer!r}: {exc}") from None
        doc, res = _read(fp, path, keep=True)
    _check_part_doc(doc, path, layer)
    return res.meta, res[layer]


def assemble_result(out: str | os.PathLike, parts: list[str | os.PathLike],
                    names: list[str], meta: Mapping[str, Any]) -> list[dict]:
    """Write the result file ``out`` from one-layer parts (``parts``, holding the layers
    ``names``, written by :func:`save_part`), one array at a time; the bytes equal
    :func:`save_result` of the same layers.

    Each part is checked first: its seal, then everything :func:`load_part` checks
    (holding a few mask rows at a time). Then only its expected arrays are copied, their
    deflate streams as they are, from a file whose seal still matches the one checked, each
    checked against its CRC on the way. A damaged part raises :class:`FormatError` naming it
    and its layer. Returns the layers' records."""
    layer_docs, seals = [], []
    for i, p in enumerate(parts):
        try:
            with open_regular(p, "result file") as fp:
                seals.append(check_seal(fp))
                doc, _ = _read(fp, os.fspath(p), keep=False)
            _check_part_doc(doc, os.fspath(p), names[i])
        except (OSError, FormatError) as exc:
            raise damaged_part(p, names[i], exc) from None
        lm = dict(doc["layers"][0])
        lm["entry"] = f"layers/{i}/"
        layer_docs.append(lm)
    doc = {**meta, "format_version": FORMAT_VERSION, "layers": layer_docs}
    with atomic_write(out, "wb") as f, ZipWriter(f) as zw:
        zw.write("meta.json", json.dumps(doc, indent=1, sort_keys=True).encode())
        for i, p in enumerate(parts):
            # Only reading the part is guarded: an error writing ``out`` (a full disk) is
            # not the part's fault and propagates as it is.
            try:
                fp = open_regular(p, "result file")
            except (OSError, FormatError) as exc:
                raise damaged_part(p, names[i], exc) from None
            with fp:
                try:
                    if check_seal(fp) != seals[i]:
                        raise FormatError("it changed while the result was assembled")
                    infos = _Archive(fp, os.fspath(p)).infos
                except FormatError as exc:
                    raise damaged_part(p, names[i], exc) from None
                for entry in _ENTRIES[layer_docs[i]["format"]]:
                    info = infos["layers/0/" + entry]
                    # The deflate stream is copied, not recompressed: the bytes equal
                    # save_result's, which compressed the same array the same way.
                    try:
                        zw.write_raw(f"layers/{i}/{entry}", info.CRC, info.file_size,
                                     info.compress_size, raw_entry(fp, info))
                    except FormatError as exc:
                        raise damaged_part(p, names[i], exc) from None
    return layer_docs
