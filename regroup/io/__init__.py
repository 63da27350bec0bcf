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
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .._validation import FormatError, RegroupError, missing_dependency
from ..pattern import Pattern, from_array, from_sparse
from .mtx import parse_mtx, read_mtx
from .safetensors import read_safetensors, safetensors_index, write_safetensors
from .smtx import parse_smtx, read_smtx, write_smtx

__all__ = ["read_patterns", "read_tensors", "tensor_shapes", "patterns_from_tensors",
           "group_tensors", "layer_pattern", "shape_problem", "SUFFIXES",
           "read_smtx", "parse_smtx", "write_smtx", "read_safetensors", "write_safetensors",
           "read_mtx", "parse_mtx"]

SUFFIXES = (".smtx", ".mtx", ".npy", ".npz", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A dense (rows x cols) bool working copy of each layer must fit comfortably in memory.
MAX_ELEMENTS = 1 << 31
_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _load_torch(path: str, lazy: bool = False) -> dict[str, Any]:
    """The tensors of a PyTorch checkpoint, flattened to dotted names. ``lazy``: storages
    of a zip-format file (every ``torch.save`` since 1.6) are memory-mapped, so only the
    tensors used are ever read; the older pickle-only format is always read whole."""
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch", f"reading {path}") from None
    try:
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
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[f"{prefix}{k}"] = v
    walk(obj, "")
    return flat


def _check_npy_header(f, available: int, where: str) -> tuple[int, ...]:
    """Refuse an .npy stream whose header declares more data than it holds (numpy would
    allocate the declared size first) or object arrays (pickles); returns its shape."""
    start = f.tell()
    head = f.read(10)
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3):
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
        shape, _, dtype = reader(f)
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
    return tuple(int(n) for n in shape)


def _npz_shapes(path: str, names=None) -> dict[str, tuple[int, ...]]:
    """Validate the .npy headers of an .npz archive (all members, or those of ``names``)
    and return ``{name: shape}`` without reading any array."""
    wanted = None if names is None else {f"{n}.npy" for n in names}
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            if "meta.json" in zf.namelist():
                raise RegroupError(f"{path}: is a regroup result file; pass the original "
                                   "mask or checkpoint (use `regroup inspect` to read it)")
            for info in zf.infolist():
                if info.filename.endswith(".npy") and (wanted is None
                                                       or info.filename in wanted):
                    with zf.open(info) as f:
                        shapes[info.filename[:-4]] = _check_npy_header(
                            f, info.file_size, f"{path}:{info.filename}")
    except zipfile.BadZipFile as exc:
        raise FormatError(f"{path}: not a valid .npz archive ({exc})") from None
    except (FormatError, RegroupError):
        raise
    except Exception as exc:
        raise FormatError(f"{path}: not a valid .npz archive ({type(exc).__name__}: "
                          f"{exc})") from None
    return shapes


def _load_npz(path: str, names=None) -> dict[str, Any]:
    _npz_shapes(path, names)
    try:
        with np.load(path, allow_pickle=False) as z:
            wanted = set(z.files if names is None else names)
            return {k: z[k] for k in z.files if k in wanted}
    except ValueError as exc:
        raise FormatError(f"{path}: {exc} (pickled objects are refused)") from None
    except Exception as exc:
        raise FormatError(f"{path}: not a valid .npz archive ({type(exc).__name__}: "
                          f"{exc})") from None


def _load_npy(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        _check_npy_header(f, os.path.getsize(path), path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise FormatError(f"{path}: {exc} (pickled objects are refused)") from None
    except Exception as exc:
        raise FormatError(f"{path}: not a valid .npy file ({type(exc).__name__}: "
                          f"{exc})") from None
    return {Path(path).stem: arr}


def _load_mtx(path: str) -> dict[str, Any]:
    matrix, has_values = read_mtx(path, max_elements=MAX_ELEMENTS)
    name = Path(path).stem
    return {name: from_sparse(matrix, name=name, has_weights=has_values)}


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
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, names)
    if suffix == ".safetensors":
        return read_safetensors(path, names)
    if suffix in TORCH_SUFFIXES:
        out = _load_torch(path, lazy=names is not None)
    elif suffix == ".smtx":
        name = Path(path).stem
        out = {name: from_sparse(read_smtx(path, max_elements=MAX_ELEMENTS), name=name)}
    elif suffix == ".mtx":
        out = _load_mtx(path)
    elif suffix == ".npy":
        out = _load_npy(path)
    else:
        raise RegroupError(f"{path}: unknown file type {suffix!r}; supported: "
                           f"{', '.join(SUFFIXES)}")
    wanted = set(out if names is None else names)
    return {k: v for k, v in out.items() if k in wanted}


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
        if not zipfile.is_zipfile(path):
            return None
        return {k: tuple(v.shape) for k, v in _load_torch(path, lazy=True).items()}
    return None


def _canonical(name: str) -> str:
    # torch.ao.pruning / parametrize: "X.parametrizations.weight.original" -> "X.weight"
    marker = ".parametrizations."
    if marker in name and name.endswith(".original"):
        head, _, tail = name.partition(marker)
        return f"{head}.{tail[:-len('.original')]}"
    return name


def group_tensors(keys) -> list[tuple[str, str | None, str | None]]:
    """The layers among tensor names: ``(layer name, weight key, mask key)`` in file order,
    by the state-dict conventions (prune's ``_orig`` / ``_mask`` pairs, ao.pruning's
    ``parametrizations.X.original``). Only names are needed, so a sharded checkpoint is
    grouped from its headers."""
    keys = list(keys)
    present = set(keys)
    used: set[str] = set()
    out: list[tuple[str, str | None, str | None]] = []
    for k in keys:
        if k in used:
            continue
        base = None
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


def layer_pattern(name: str, weight: Any, mask: Any, *, source: str = "<tensors>",
                  block: tuple[int, int] | None = None) -> tuple[Pattern | None, str | None]:
    """One layer's Pattern from its weight and/or mask, or ``(None, reason)`` when it is
    not usable (not a tensor, wrong shape, empty, fully dense, smaller than the block)."""
    ref = mask if mask is not None else weight
    if isinstance(ref, Pattern):
        pat = ref
    elif not hasattr(ref, "shape") or not hasattr(ref, "dtype"):
        return None, f"not a tensor ({type(ref).__name__})"
    else:
        problem = shape_problem(ref.shape)
        if problem:
            return None, problem
        rows, cols = int(ref.shape[0]), int(np.prod(ref.shape[1:]))
        if rows * cols > MAX_ELEMENTS:
            raise RegroupError(f"{source}: layer {name!r} has {rows}x{cols} elements, "
                               f"above the limit of {MAX_ELEMENTS}")
        try:
            pat = from_array(weight, name=name, mask=mask)
        except (RegroupError, TypeError) as exc:
            raise RegroupError(f"{source}: {exc}") from None
    if pat.nnz == 0:
        return None, "empty (every entry is zero)"
    if pat.nnz == pat.n_rows * pat.n_cols:
        return None, "fully dense (no zero): not pruned"
    if block is not None and (block[0] > pat.n_rows or block[1] > pat.n_cols):
        return None, (f"matrix {pat.n_rows}x{pat.n_cols} is smaller than the block "
                      f"{block[0]}x{block[1]}")
    return pat, None


def patterns_from_tensors(tensors: dict[str, Any], *, source: str = "<tensors>",
                          block: tuple[int, int] | None = None
                          ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Apply the state-dict conventions to named tensors.

    Returns the usable layers and ``(name, reason)`` for every tensor that is not one.
    """
    patterns: list[Pattern] = []
    skipped: list[tuple[str, str]] = []
    for name, wkey, mkey in group_tensors(tensors):
        pat, reason = layer_pattern(name, tensors.get(wkey) if wkey else None,
                                    tensors[mkey] if mkey else None, source=source,
                                    block=block)
        if pat is None:
            skipped.append((name, reason))
        else:
            patterns.append(pat)
    return patterns, skipped


def read_patterns(path: str | os.PathLike, *, layers: str | list[str] | None = None,
                  block: tuple[int, int] | None = None
                  ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Read the usable layers of a file, selected by glob.

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
    from ..options import resolve_options

    selection = resolve_options(None, "read_patterns", layers=layers)
    path = os.fspath(path)
    tensors = read_tensors(path)
    patterns, skipped = patterns_from_tensors(tensors, source=path, block=block)
    if layers is not None:
        all_names = [p.name for p in patterns] + [n for n, _ in skipped]
        keep = set(selection.select(all_names, where=path))
        patterns = [p for p in patterns if p.name in keep]
        skipped = [s for s in skipped if s[0] in keep]
    if not patterns:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "the file holds no tensor"
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        raise RegroupError(f"{path}: no usable layer: {why}{more}")
    return patterns, skipped


