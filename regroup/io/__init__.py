"""Reading masks and checkpoints into :class:`~regroup.pattern.Pattern` objects.

Formats (by file suffix):

========================  ===========================================================
``.smtx``                 DLMC pattern (one layer, named by the file stem)
``.mtx``                  MatrixMarket, pattern or values (one layer)
``.npy``                  one array (one layer)
``.npz``                  one layer per array
``.safetensors``          one layer per tensor
``.pt .pth .bin .ckpt``   PyTorch state dict, loaded with ``weights_only=True``
========================  ===========================================================

State-dict conventions: ``X.weight_orig`` + ``X.weight_mask`` (torch.nn.utils.prune) give
layer ``X.weight`` with magnitudes from ``_orig``; a lone ``X.weight_mask`` is a mask
(magnitudes from ``X.weight`` if present); ``X.parametrizations.weight.original``
(torch.ao.pruning) is read as ``X.weight``; any other 2-D or 4-D tensor is a weight whose
zeros are the pruned positions, and a boolean tensor is a mask. A nested
``{"state_dict": ...}`` (or ``"model"``, ``"model_state_dict"``) is unwrapped.

Inputs are read from regular files only: a FIFO, device or socket is refused before it
is opened (it would block, or never end). A PyTorch tensor that may be a layer must hold
dense data: sparse, meta and quantized tensors are refused naming the tensor, and one
whose storage is smaller than its logical size (expanded with stride 0, or overlapping)
is materialised only up to :data:`MAX_EXPANDED_BYTES` (64 MiB). Nested dicts are
flattened up to :data:`MAX_NESTING` levels.

Tensors that are not pruned layers are skipped with a reason (:func:`layer_pattern`):
wrong rank, empty, fully dense or denser than ``dense_above``
(:data:`regroup.options.DENSE_ABOVE`), smaller than the block, and embedding tables
(:func:`embedding_name`: rows are looked up, not multiplied, so block sparsity buys no
matmul; a table is regrouped when ``layers`` names it exactly).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ..validation import (FormatError, RegroupError, check_regular, missing_dependency,
                           open_regular)
from ..nm import nm_problem
from ..options import DENSE_ABOVE, resolve_options
from ..pattern import Pattern, count_kept, from_array, from_sparse
from ..provenance import FileRecord, checked_record, file_stamp, sha256_rest
from .mtx import parse_mtx, read_mtx
from .safetensors import (read_safetensors, safetensors_index, safetensors_record,
                          write_safetensors)
from .smtx import parse_smtx, read_smtx, write_smtx

__all__ = ["read_patterns", "read_tensors", "tensor_shapes", "index_file", "Indexed",
           "ZipMember", "read_npz_members", "mapped_torch",
           "patterns_from_tensors",
           "group_tensors", "layer_pattern", "shape_problem", "tensor_problem",
           "embedding_name", "EMBEDDING_NAMES", "SUFFIXES",
           "read_smtx", "parse_smtx", "write_smtx", "read_safetensors", "write_safetensors",
           "read_mtx", "parse_mtx"]

SUFFIXES = (".smtx", ".mtx", ".npy", ".npz", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A dense (rows x cols) bool working copy of each layer must fit comfortably in memory.
MAX_ELEMENTS = 1 << 31
# A PyTorch tensor whose storage is smaller than its logical size (expanded with stride 0,
# or overlapping) costs its logical size once materialised: a 2 KB file can hold an
# 8 GB stride-0 matrix. Such a tensor that may be a layer is materialised only up to
# this many bytes; above it, the file is refused naming the tensor.
MAX_EXPANDED_BYTES = 1 << 26
# Nested dicts of a PyTorch checkpoint are flattened to dotted names up to this depth.
MAX_NESTING = 64
_WRAPPERS = ("state_dict", "model_state_dict", "model")
# Attribute names of embedding tables (nn.Embedding) across common model families: BERT
# and its kin (word_/position_/token_type_embeddings), GPT-2 (wte, wpe), Meta's LLaMA
# (tok_embeddings), Hugging Face decoders (embed_tokens, embed_positions), GPT-NeoX
# (embed_in), CLIP (token_/position_embedding), ViT-style pos_embed, and the generic
# embed/embedding/embeddings. Matched exactly against the last module component, so the
# Linear layers beside them are kept: lm_head, GPT-NeoX's embed_out, ALBERT's
# embedding_hidden_mapping_in, ELECTRA's embeddings_project. T5/BART's "shared" is left
# out: too common a word for a Linear (its table is caught by dense_above unless pruned).
EMBEDDING_NAMES = frozenset({
    "embed", "embeds", "embedding", "embeddings", "embed_tokens", "embed_positions",
    "embed_in", "tok_embeddings", "token_embedding", "token_embeddings", "word_embedding",
    "word_embeddings", "position_embedding", "position_embeddings", "token_type_embeddings",
    "pos_embed", "pos_embedding", "wte", "wpe"})


def _torch_problem(t: Any) -> str | None:
    """Why the PyTorch tensor ``t``, which may be a layer (2-D or 4-D, not empty), cannot
    be read as a dense array within bounded memory (None: it can)."""
    import torch
    if t.layout != torch.strided:
        return (f"a sparse tensor (layout {str(t.layout).removeprefix('torch.')}); regroup "
                "reads dense tensors: save it with .to_dense()")
    if t.is_meta:
        return "a meta tensor, which holds no data (saved from a model on the 'meta' device)"
    if t.is_quantized:
        return "a quantized tensor; save it with .dequantize()"
    shape, strides = tuple(t.shape), tuple(t.stride())
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(shape, strides))
    logical = t.numel() * t.element_size()
    if span < t.numel() and logical > MAX_EXPANDED_BYTES:
        return (f"an expanded or overlapping tensor (shape {list(shape)}, strides "
                f"{list(strides)}): its storage holds {span} elements for {t.numel()} "
                f"logical ones, {logical} bytes once materialised, above the limit of "
                f"{MAX_EXPANDED_BYTES} (regroup.io.MAX_EXPANDED_BYTES); save it with "
                ".contiguous()")
    return None


def _flatten(obj: dict, path: str, torch: Any) -> dict[str, Any]:
    """The tensors of nested dicts, by dotted name, in depth-first order; nesting deeper
    than :data:`MAX_NESTING` (or a dict holding itself) is a :class:`FormatError`."""
    flat: dict[str, Any] = {}
    stack = [(iter(obj.items()), "")]
    while stack:
        items, prefix = stack[-1]
        for k, v in items:
            if isinstance(v, dict):
                if len(stack) >= MAX_NESTING:
                    raise FormatError(f"{path}: dicts nested deeper than {MAX_NESTING} "
                                      f"levels (at {prefix[:200]!r}...); not a state dict")
                stack.append((iter(v.items()), f"{prefix}{k}."))
                break
            if isinstance(v, torch.Tensor):
                flat[f"{prefix}{k}"] = v
        else:
            stack.pop()
    return flat


def _load_torch(path: str, lazy: bool = False, data: bytes | None = None) -> dict[str, Any]:
    """The tensors of a PyTorch checkpoint, flattened to dotted names. ``lazy``: storages
    of a zip-format file (every ``torch.save`` since 1.6) are memory-mapped, so only the
    tensors used are ever read; the older pickle-only format is always read whole.
    ``data``: the file's bytes, already read (``path`` then names it in errors).

    A tensor that may be a layer (2-D or 4-D, not empty) and cannot be read as a dense
    array within bounded memory - sparse, meta, quantized, or expanded beyond
    :data:`MAX_EXPANDED_BYTES` - is a :class:`FormatError` naming it."""
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch", f"reading {path}") from None
    if data is None:
        check_regular(path, "PyTorch checkpoint")
    try:
        if data is not None:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=lazy and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for bad or hostile files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: cannot be read as a PyTorch checkpoint with "
                          f"weights_only=True ({type(exc).__name__}: {msg[:200]})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    flat = _flatten(obj, path, torch)
    for name, t in flat.items():
        if shape_problem(t.shape) is None:       # may be a layer: it may be loaded
            problem = _torch_problem(t)
            if problem is not None:
                raise FormatError(f"{path}: tensor {name!r} is {problem}")
    return flat


def _npy_header(f, available: int, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Refuse an .npy stream whose header declares more data than it holds (numpy would
    allocate the declared size first) or object arrays (pickles); returns its shape,
    dtype and whether it is in Fortran order, ``f`` left at the first data byte."""
    start = f.tell()
    head = f.read(10)
    # Only versions 1.0, 2.0 and 3.0 exist; the length checked here must be the one
    # numpy reads next (2 bytes for 1.0, 4 otherwise).
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3) or head[7]:
        raise FormatError(f"{where}: not a valid .npy array (bad magic or version)")
    if head[6] == 1:
        hlen = struct.unpack("<H", head[8:10])[0]
    else:
        hlen = struct.unpack("<I", head[8:10] + f.read(2))[0]
    # Checked before numpy reads it: a damaged length would size a huge read.
    if hlen > min(available - f.tell(), 1 << 20):
        raise FormatError(f"{where}: .npy header length {hlen} exceeds the data")
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(f)
    except Exception as exc:  # numpy's header parser raises many types on damaged input
        raise FormatError(f"{where}: not a valid .npy array ({type(exc).__name__}: "
                          f"{exc})") from None
    if dtype.hasobject:
        raise FormatError(f"{where}: holds Python objects (pickled objects are refused)")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = available - f.tell()
    if need != have:
        raise FormatError(f"{where}: header declares shape {list(shape)} of {dtype} "
                          f"({need} bytes) but {have} bytes follow")
    return tuple(int(n) for n in shape), dtype, bool(fortran)


def _check_npy_header(f, available: int, where: str) -> tuple[int, ...]:
    """The shape of a checked .npy stream (:func:`_npy_header`)."""
    return _npy_header(f, available, where)[0]


class ZipMember(NamedTuple):
    """Where an .npz member lies (from the archive's central directory), so that it can be
    read on its own, without reading the archive's directory again."""

    offset: int        # of its local file header
    method: int        # zipfile.ZIP_STORED or ZIP_DEFLATED
    csize: int         # bytes stored
    size: int          # bytes once decompressed
    crc: int


def _npz_shapes(path: str, names=None, f: BinaryIO | None = None,
                members: dict[str, ZipMember] | None = None) -> dict[str, tuple[int, ...]]:
    """Validate the .npy headers of an .npz archive (all members, or those of ``names``)
    and return ``{name: shape}`` without reading any array; ``f``: the archive, open;
    ``members``: filled with where each member lies (:class:`ZipMember`)."""
    wanted = None if names is None else {f"{n}.npy" for n in names}
    shapes = {}
    try:
        with zipfile.ZipFile(open_regular(path, ".npz archive") if f is None else f) as zf:
            if "meta.json" in zf.namelist():
                raise RegroupError(f"{path}: is a regroup result file; pass the original "
                                   "mask or checkpoint (use `regroup inspect` to read it)")
            for info in zf.infolist():
                if info.filename.endswith(".npy") and (wanted is None
                                                       or info.filename in wanted):
                    with zf.open(info) as member:
                        shapes[info.filename[:-4]] = _check_npy_header(
                            member, info.file_size, f"{path}:{info.filename}")
                    if members is not None:     # the last of a repeated name, as zipfile
                        members[info.filename[:-4]] = ZipMember(
                            info.header_offset, info.compress_type, info.compress_size,
                            info.file_size, info.CRC)
    except zipfile.BadZipFile as exc:
        raise FormatError(f"{path}: not a valid .npz archive ({exc})") from None
    except (FormatError, RegroupError):
        raise
    except Exception as exc:
        raise FormatError(f"{path}: not a valid .npz archive ({type(exc).__name__}: "
                          f"{exc})") from None
    return shapes


def _load_npz(path: str, names=None) -> dict[str, Any]:
    with open_regular(path, ".npz archive") as f:
        _npz_shapes(path, names, f)
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as z:
                wanted = set(z.files if names is None else names)
                return {k: z[k] for k in z.files if k in wanted}
        except ValueError as exc:
            raise FormatError(f"{path}: {exc} (pickled objects are refused)") from None
        except Exception as exc:
            raise FormatError(f"{path}: not a valid .npz archive ({type(exc).__name__}: "
                              f"{exc})") from None


def read_npz_members(path: str | os.PathLike, members: dict[str, ZipMember],
                     names=None) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive's members ``names`` (all of ``members`` when None;
    in file order), each read on its own from where :func:`index_file` found it: one
    seek per member, so reading every layer of an archive is linear in its member count
    (a ``zipfile`` would read the whole directory for each). Checked as ``np.load``
    checks them (.npy header, CRC-32)."""
    path = os.fspath(path)
    wanted = sorted(members if names is None else {n for n in names if n in members},
                    key=lambda n: (members[n].offset, n))
    out: dict[str, np.ndarray] = {}
    with open_regular(path, ".npz archive") as f:
        for name in wanted:
            m = members[name]
            where = f"{path}:{name}.npy"
            f.seek(m.offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise FormatError(f"{where}: no zip member at offset {m.offset} (the file "
                                  "changed since it was indexed - run again)")
            flags, = struct.unpack("<H", head[6:8])
            skip = sum(struct.unpack("<HH", head[26:30]))
            if flags & 1:
                raise FormatError(f"{where}: an encrypted zip member")
            if m.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise FormatError(f"{where}: unsupported zip compression {m.method}")
            f.seek(m.offset + 30 + skip)
            buf = bytearray(m.csize)
            if f.readinto(buf) != m.csize:
                raise FormatError(f"{where}: cut short (the file changed since it was "
                                  "indexed - run again)")
            if m.method == zipfile.ZIP_DEFLATED:
                z = zlib.decompressobj(-15)
                buf = bytearray(z.decompress(buf, m.size + 1))
            if len(buf) != m.size or zlib.crc32(buf) != m.crc:
                raise FormatError(f"{where}: damaged zip member (size or CRC-32 differs "
                                  "from the archive's directory)")
            out[name] = _npy_array(buf, where)
    return out


def _npy_array(buf: bytearray, path: str) -> np.ndarray:
    """The array of an .npy file whose bytes are ``buf`` (checked by :func:`_npy_header`),
    a writable view of ``buf``: no second copy."""
    head = io.BytesIO(bytes(memoryview(buf)[:(1 << 20) + 16]))
    shape, dtype, fortran = _npy_header(head, len(buf), path)
    count = int(np.prod(shape, dtype=object))
    if count == 0:
        return np.empty(shape, dtype, order="F" if fortran else "C")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=head.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _load_npy(path: str) -> dict[str, Any]:
    with open_regular(path, ".npy file") as f:
        buf = _read_all(f, os.fstat(f.fileno()), None, path)
    return {Path(path).stem: _npy_array(buf, path)}


def _load_mtx(path: str, data: bytes | None = None) -> dict[str, Any]:
    matrix, has_values = read_mtx(path, max_elements=MAX_ELEMENTS, data=data)
    name = Path(path).stem
    return {name: from_sparse(matrix, name=name, has_weights=has_values)}


def _load_smtx(path: str, data: bytes | None = None) -> dict[str, Any]:
    name = Path(path).stem
    return {name: from_sparse(read_smtx(path, max_elements=MAX_ELEMENTS, data=data),
                              name=name)}


def _read_all(f: BinaryIO, before: os.stat_result, h: Any, path: str) -> bytearray:
    """The whole regular file ``f`` (of ``before.st_size`` bytes), read into one buffer
    and fed into ``h`` (a hashlib object, or None) on the way."""
    buf = bytearray(before.st_size)
    with memoryview(buf) as view:
        pos = 0
        while pos < len(buf):
            n = f.readinto(view[pos:pos + (1 << 20)])
            if not n:
                break
            if h is not None:
                h.update(view[pos:pos + n])
            pos += n
    if pos != len(buf) or f.read(1):
        raise RegroupError(f"{path}: the input changed while it was read; run again once "
                           "it is complete")
    return buf


class Indexed(NamedTuple):
    """A file indexed by :func:`index_file`."""

    shapes: dict[str, tuple[int, ...]] | None   # None: the file is read whole
    tensors: dict[str, Any] | None              # a file read whole: its tensors
    record: FileRecord                          # size, mtime, inode, device, SHA-256
    members: dict[str, ZipMember] | None = None  # .npz: where each array lies


def index_file(path: str | os.PathLike) -> Indexed:
    """Index a checkpoint file and take its :class:`~regroup.provenance.FileRecord`
    (SHA-256 included) through one open handle of the regular file: the shapes of a
    multi-tensor file (safetensors and .npz headers, a memory-mapped PyTorch zip
    checkpoint), or the tensors of a file that can only be read whole (single-tensor
    formats, pre-1.6 PyTorch pickles) parsed from the very bytes that were hashed.

    Raises
    ------
    RegroupError
        ``path`` is not a regular file, or changed while it was read.
    FormatError
        The file is damaged or not of its suffix's format.
    """
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise RegroupError(f"{path}: unknown file type {suffix!r}; supported: "
                           f"{', '.join(SUFFIXES)}")
    if suffix == ".safetensors":
        index, record = safetensors_record(path)
        return Indexed({k: v[1] for k, v in index.items()}, None, record)
    with open_regular(path, "input") as f:
        before = os.fstat(f.fileno())
        if suffix == ".npz" or (suffix in TORCH_SUFFIXES and zipfile.is_zipfile(f)):
            members: dict[str, ZipMember] | None = {} if suffix == ".npz" else None
            shapes = _npz_shapes(path, f=f, members=members) if suffix == ".npz" else None
            f.seek(0)
            record = checked_record(f, path, before, sha256_rest(f).hexdigest())
            if shapes is None:   # torch maps the file by its name: it must be the same
                shapes = {k: tuple(v.shape) for k, v in mapped_torch(path).items()}
                if file_stamp(os.stat(path)) != record.stamp():
                    raise RegroupError(f"{path}: the input changed while it was read; run "
                                       "again once it is complete")
            return Indexed(shapes, None, record, members)
        f.seek(0)                               # is_zipfile read the end of the file
        h = hashlib.sha256()
        buf = _read_all(f, before, h, path)
        record = checked_record(f, path, before, h.hexdigest())
    if suffix == ".npy":
        tensors: dict[str, Any] = {Path(path).stem: _npy_array(buf, path)}
    else:
        data = bytes(buf)
        del buf
        tensors = (_load_smtx(path, data) if suffix == ".smtx" else
                   _load_mtx(path, data) if suffix == ".mtx" else
                   _load_torch(path, data=data))
    return Indexed(None, tensors, record)




def read_tensors(path: str | os.PathLike, names=None) -> dict[str, Any]:
    """Read a file into a mapping of tensor name to array (numpy, torch) or Pattern.

    ``names``: read only these tensors (file order kept). Multi-tensor formats then read
    only their bytes: safetensors and .npz members directly, PyTorch zip checkpoints
    through memory-mapped storages."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise RegroupError(f"{path}: is a directory; pass a mask or checkpoint file")
    check_regular(path, "input")    # a FIFO or device is never opened: it would block
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, names)
    if suffix == ".safetensors":
        return read_safetensors(path, names)
    if suffix in TORCH_SUFFIXES:
        out = _load_torch(path, lazy=names is not None)
    elif suffix == ".smtx":
        out = _load_smtx(path)
    elif suffix == ".mtx":
        out = _load_mtx(path)
    elif suffix == ".npy":
        out = _load_npy(path)
    else:
        raise RegroupError(f"{path}: unknown file type {suffix!r}; supported: "
                           f"{', '.join(SUFFIXES)}")
    wanted = set(out if names is None else names)
    return {k: v for k, v in out.items() if k in wanted}


def mapped_torch(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a PyTorch zip checkpoint (every ``torch.save`` since 1.6), by dotted
    name, memory-mapped: none of their data is read until used."""
    return _load_torch(os.fspath(path), lazy=True)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of a multi-tensor file read without its data (safetensors and
    .npz headers, a memory-mapped PyTorch zip checkpoint), or None for a file that can
    only be read whole (single-tensor formats, pre-1.6 PyTorch pickles)."""
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return _npz_shapes(path)
    if suffix == ".safetensors":
        return {k: v[1] for k, v in safetensors_index(path)[0].items()}
    if suffix in TORCH_SUFFIXES:
        check_regular(path, "PyTorch checkpoint")
        if not zipfile.is_zipfile(path):
            return None
        return {k: tuple(v.shape) for k, v in _load_torch(path, lazy=True).items()}
    return None


_PARAMETRIZED = ".parametrizations."


def _canonical(name: str) -> str:
    # torch.ao.pruning / parametrize: "X.parametrizations.weight.original" -> "X.weight"
    if _PARAMETRIZED in name and name.endswith(".original"):
        head, _, tail = name.partition(_PARAMETRIZED)
        return f"{head}.{tail[:-len('.original')]}"
    return name


def _ao_mask(key: str, present: Collection[str]) -> str | None:
    """The ``original`` tensor whose torch.ao.pruning mask ``key`` is
    (``X.parametrizations.weight.0.mask`` -> ``X.parametrizations.weight.original``)."""
    head, sep, tail = key.rpartition(_PARAMETRIZED)
    parts = tail.split(".")
    if not sep or len(parts) != 3 or parts[2] != "mask" or not parts[1].isdigit():
        return None
    original = f"{head}{_PARAMETRIZED}{parts[0]}.original"
    return original if original in present else None


def group_tensors(keys, where: str = "<tensors>") -> list[tuple[str, str | None, str | None]]:
    """The layers among tensor names: ``(layer name, weight key, mask key)`` in file order,
    by the state-dict conventions (prune's ``_orig`` / ``_mask`` pairs, ao.pruning's
    ``parametrizations.X.original`` with its ``parametrizations.X.0.mask``). Only names
    are needed, so a sharded checkpoint is grouped from its headers.

    Raises FormatError when two groups would be one layer (``fc.weight`` beside
    ``fc.parametrizations.weight.original``): one of them would be silently lost."""
    keys = list(keys)
    present = set(keys)
    ao_masks = {}
    for k in keys:
        original = _ao_mask(k, present)
        if original is not None:
            ao_masks.setdefault(original, k)
    used: set[str] = set()
    out: list[tuple[str, str | None, str | None]] = []
    for k in keys:
        if k in used:
            continue
        base = None
        if k in ao_masks or _ao_mask(k, present) is not None:
            original = k if k in ao_masks else _ao_mask(k, present)
            used.update((original, ao_masks[original]))
            out.append((_canonical(original), original, ao_masks[original]))
            continue
        if k.endswith("_mask"):
            base = k[: -len("_mask")]
        elif k.endswith("_orig") and k[: -len("_orig")] + "_mask" in present:
            base = k[: -len("_orig")]
        elif k + "_mask" in present:
            base = k
        if base is None:
            used.add(k)
            out.append((_canonical(k), k, None))
            continue
        group = (base + "_mask", base + "_orig", base)
        used.update(g for g in group if g in present)
        weight = base + "_orig" if base + "_orig" in present else (
            base if base in present else None)
        out.append((_canonical(base), weight, base + "_mask"))
    seen: dict[str, tuple[str | None, str | None]] = {}
    for name, w, m in out:
        if name in seen:
            a = [k for k in seen[name] if k]
            b = [k for k in (w, m) if k]
            raise FormatError(f"{where}: tensors {a} and {b} are both layer {name!r} (one of them "
                              "would be lost); keep one of them")
        seen[name] = (w, m)
    return out


def shape_problem(shape) -> str | None:
    """Why a tensor of this shape is not a layer (None when it may be one)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 4):
        return (f"{len(shape)}-D tensor {list(shape)} (regroup takes 2-D Linear or 4-D "
                "Conv2d weights)")
    if shape[0] * int(np.prod(shape[1:])) == 0:
        return f"zero-size tensor {list(shape)}"
    return None


def embedding_name(name: str, shape) -> str | None:
    """The name component that makes tensor ``name`` an embedding table, or None.

    A table is a 2-D tensor whose module's own name (the last component before a final
    ``.weight``) is one of :data:`EMBEDDING_NAMES`: ``embeddings.word_embeddings.weight``,
    ``transformer.wte.weight``, ``model.embed_tokens.weight``. 4-D tensors are never
    tables (patch embeddings are convolutions), nor is ``lm_head.weight``."""
    if len(tuple(shape)) != 2:
        return None
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    last = module.rsplit(".", 1)[-1]
    return last if last in EMBEDDING_NAMES else None


def tensor_problem(name: str, shape, *, block: tuple[int, int] | None = None,
                   skip_embeddings: bool = False, nm: tuple[int, int] | None = None
                   ) -> str | None:
    """Why tensor ``name`` of this shape is not a layer to regroup, known without its data
    (None when it may be one): rank or size (:func:`shape_problem`), an embedding table
    (with ``skip_embeddings``), a matrix smaller than ``block``; with ``nm`` (the N:M
    format) ``block`` does not apply and the column count must be a multiple of M."""
    problem = shape_problem(shape)
    if problem:
        return problem
    shape = tuple(int(s) for s in shape)
    table = embedding_name(name, shape) if skip_embeddings else None
    if table is not None:
        return (f"embedding table ({table!r}): rows are looked up, not multiplied; "
                "name it exactly in layers to regroup it")
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if nm is not None:        # a 1xM group fits any matrix; groups are never padded
        return nm_problem(rows, cols, nm)
    if block is not None and (block[0] > rows or block[1] > cols):
        return f"matrix {rows}x{cols} is smaller than the block {block[0]}x{block[1]}"
    return None


def layer_pattern(name: str, weight: Any, mask: Any, *, source: str = "<tensors>",
                  block: tuple[int, int] | None = None, dense_above: float = 1.0,
                  skip_embeddings: bool = False, nm: tuple[int, int] | None = None
                  ) -> tuple[Pattern | None, str | None]:
    """One layer's Pattern from its weight and/or mask, or ``(None, reason)`` when it is
    not usable: not a tensor, wrong shape, an embedding table (``skip_embeddings``),
    empty, fully dense, of density above ``dense_above``, smaller than ``block``. The
    defaults skip only what no regrouping can take, as before these options existed.
    ``nm``: the rule of the N:M format instead - dense tensors are taken too (N:M prunes
    them; no density rule applies), ``block`` does not apply (a 1xM group fits any
    matrix), and the column count must be a multiple of M (groups are never padded).

    The density is counted before the pattern is built, so a skipped dense table costs
    one pass over its values, not a sparse copy of them.

    Raises
    ------
    RegroupError
        NaN or inf in the mask (or the weight when there is no mask), or in the kept
        weights of a layer that is built; a layer above :data:`MAX_ELEMENTS`.
    """
    ref = mask if mask is not None else weight
    if isinstance(ref, Pattern):
        shape: tuple[int, ...] = tuple(ref.shape)
    elif not hasattr(ref, "shape") or not hasattr(ref, "dtype"):
        return None, f"not a tensor ({type(ref).__name__})"
    else:
        shape = tuple(int(s) for s in ref.shape)
    problem = tensor_problem(name, shape, skip_embeddings=skip_embeddings, nm=nm)
    if problem:
        return None, problem
    rows, cols = shape[0], int(np.prod(shape[1:]))
    dense = nm is not None
    if dense:
        block = None
    if isinstance(ref, Pattern):
        kept = ref.nnz
    else:
        if rows * cols > MAX_ELEMENTS:
            raise RegroupError(f"{source}: layer {name!r} has {rows}x{cols} elements, "
                               f"above the limit of {MAX_ELEMENTS}")
        if mask is not None and weight is not None and \
                tuple(getattr(weight, "shape", ())) != shape:
            # A broken prune pair is an error even when its mask would be skipped.
            raise RegroupError(f"{source}: layer {name!r}: weight shape "
                               f"{tuple(getattr(weight, 'shape', ()))} differs from mask "
                               f"shape {shape}")
        try:
            kept = count_kept(ref, what="weight" if mask is None else "mask", name=name)
        except (RegroupError, TypeError) as exc:
            raise RegroupError(f"{source}: {exc}") from None
    if kept == 0:
        return None, "empty (every entry is zero)"
    if kept == rows * cols and not dense:
        return None, "fully dense (no zero): not pruned"
    density = kept / (rows * cols)
    if density > dense_above and not dense:
        return None, (f"nearly dense (density {density:.4f} > dense_above "
                      f"{dense_above:g}): not pruned")
    # After the density: a small layer that is also empty or dense is reported as such,
    # the reason that holds whatever the block.
    problem = tensor_problem(name, shape, block=block)
    if problem:
        return None, problem
    if isinstance(ref, Pattern):
        return ref, None
    try:
        return from_array(weight, name=name, mask=mask), None
    except (RegroupError, TypeError) as exc:
        raise RegroupError(f"{source}: {exc}") from None


def patterns_from_tensors(tensors: dict[str, Any], *, source: str = "<tensors>",
                          block: tuple[int, int] | None = None, dense_above: float = 1.0,
                          skip_embeddings: bool = False, explicit: Collection[str] = (),
                          nm: tuple[int, int] | None = None
                          ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Apply the state-dict conventions to named tensors.

    Returns the usable layers and ``(name, reason)`` for every tensor that is not one
    (:func:`layer_pattern`, with its ``nm`` rule; the layers named in ``explicit`` are
    exempt from ``skip_embeddings``).
    """
    patterns: list[Pattern] = []
    skipped: list[tuple[str, str]] = []
    for name, wkey, mkey in group_tensors(tensors, source):
        pat, reason = layer_pattern(name, tensors.get(wkey) if wkey else None,
                                    tensors[mkey] if mkey else None, source=source,
                                    block=block, dense_above=dense_above,
                                    skip_embeddings=skip_embeddings and name not in explicit,
                                    nm=nm)
        if pat is None:
            skipped.append((name, reason))
        else:
            patterns.append(pat)
    return patterns, skipped


def read_patterns(path: str | os.PathLike, *, layers: str | list[str] | None = None,
                  block: tuple[int, int] | None = None, dense_above: float = DENSE_ABOVE,
                  skip_embeddings: bool = True, nm: tuple[int, int] | None = None
                  ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Read the usable layers of a file, selected by glob.

    ``block``: skip matrices smaller than it (None: no size check). ``dense_above``,
    ``skip_embeddings`` (embedding tables not named exactly in ``layers``) and ``nm`` (the
    N:M format's rule) skip what ``regroup run`` skips (:func:`layer_pattern`).

    Returns
    -------
    patterns : list of Pattern
    skipped : list of (name, reason)

    Raises
    ------
    FileNotFoundError, FormatError
    RegroupError
        When ``layers`` matches nothing, or no selected layer is usable (the message lists
        why, layer by layer).
    """
    selection = resolve_options(None, "read_patterns", layers=layers,
                                dense_above=dense_above)
    if not isinstance(skip_embeddings, bool):
        raise TypeError(f"The 'skip_embeddings' parameter of read_patterns must be a bool. "
                        f"Got {skip_embeddings!r} instead.")
    path = os.fspath(path)
    tensors = read_tensors(path)
    if layers is not None:
        # Select before building patterns: an unselected table is never scanned.
        groups = group_tensors(tensors, path)
        keep = set(selection.select([n for n, _, _ in groups], where=path))
        tensors = {k: tensors[k] for n, w, m in groups if n in keep for k in (w, m) if k}
    patterns, skipped = patterns_from_tensors(
        tensors, source=path, block=block, dense_above=selection.dense_above,
        skip_embeddings=skip_embeddings, explicit=selection.layers or (), nm=nm)
    if not patterns:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "the file holds no tensor"
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        raise RegroupError(f"{path}: no usable layer: {why}{more}")
    return patterns, skipped


