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

Tensors that are not pruned layers are skipped with a reason (:func:`layer_pattern`):
wrong rank, empty, fully dense or denser than ``dense_above``
(:data:`regroup.options.DENSE_ABOVE`), smaller than the block, and embedding tables
(:func:`embedding_name`: rows are looked up, not multiplied, so block sparsity buys no
matmul; a table is regrouped when ``layers`` names it exactly).
"""
from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from .._validation import FormatError, RegroupError, missing_dependency
from ..options import DENSE_ABOVE, resolve_options
from ..pattern import Pattern, count_kept, from_array, from_sparse
from .mtx import parse_mtx, read_mtx
from .safetensors import read_safetensors, safetensors_index, write_safetensors
from .smtx import parse_smtx, read_smtx, write_smtx

__all__ = ["read_patterns", "read_tensors", "tensor_shapes", "patterns_from_tensors",
           "group_tensors", "layer_pattern", "shape_problem", "tensor_problem",
           "embedding_name", "EMBEDDING_NAMES", "SUFFIXES",
           "read_smtx", "parse_smtx", "write_smtx", "read_safetensors", "write_safetensors",
           "read_mtx", "parse_mtx"]

SUFFIXES = (".smtx", ".mtx", ".npy", ".npz", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A dense (rows x cols) bool working copy of each layer must fit comfortably in memory.
MAX_ELEMENTS = 1 << 31
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
                   skip_embeddings: bool = False) -> str | None:
    """Why tensor ``name`` of this shape is not a layer to regroup, known without its data
    (None when it may be one): rank or size (:func:`shape_problem`), an embedding table
    (with ``skip_embeddings``), a matrix smaller than ``block``."""
    problem = shape_problem(shape)
    if problem:
        return problem
    shape = tuple(int(s) for s in shape)
    table = embedding_name(name, shape) if skip_embeddings else None
    if table is not None:
        return (f"embedding table ({table!r}): rows are looked up, not multiplied; "
                "name it exactly in layers to regroup it")
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if block is not None and (block[0] > rows or block[1] > cols):
        return f"matrix {rows}x{cols} is smaller than the block {block[0]}x{block[1]}"
    return None


def layer_pattern(name: str, weight: Any, mask: Any, *, source: str = "<tensors>",
                  block: tuple[int, int] | None = None, dense_above: float = 1.0,
                  skip_embeddings: bool = False) -> tuple[Pattern | None, str | None]:
    """One layer's Pattern from its weight and/or mask, or ``(None, reason)`` when it is
    not usable: not a tensor, wrong shape, an embedding table (``skip_embeddings``),
    empty, fully dense, of density above ``dense_above``, smaller than ``block``. The
    defaults skip only what no regrouping can take, as before these options existed.

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
    problem = tensor_problem(name, shape, skip_embeddings=skip_embeddings)
    if problem:
        return None, problem
    rows, cols = shape[0], int(np.prod(shape[1:]))
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
    if kept == rows * cols:
        return None, "fully dense (no zero): not pruned"
    density = kept / (rows * cols)
    if density > dense_above:
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
                          skip_embeddings: bool = False, explicit: Collection[str] = ()
                          ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Apply the state-dict conventions to named tensors.

    Returns the usable layers and ``(name, reason)`` for every tensor that is not one
    (:func:`layer_pattern`; the layers named in ``explicit`` are exempt from
    ``skip_embeddings``).
    """
    patterns: list[Pattern] = []
    skipped: list[tuple[str, str]] = []
    for name, wkey, mkey in group_tensors(tensors):
        pat, reason = layer_pattern(name, tensors.get(wkey) if wkey else None,
                                    tensors[mkey] if mkey else None, source=source,
                                    block=block, dense_above=dense_above,
                                    skip_embeddings=skip_embeddings and name not in explicit)
        if pat is None:
            skipped.append((name, reason))
        else:
            patterns.append(pat)
    return patterns, skipped


def read_patterns(path: str | os.PathLike, *, layers: str | list[str] | None = None,
                  block: tuple[int, int] | None = None, dense_above: float = DENSE_ABOVE,
                  skip_embeddings: bool = True
                  ) -> tuple[list[Pattern], list[tuple[str, str]]]:
    """Read the usable layers of a file, selected by glob.

    ``block``: skip matrices smaller than it (None: no size check). ``dense_above`` and
    ``skip_embeddings`` (embedding tables not named exactly in ``layers``) skip what
    ``regroup run`` skips (:func:`layer_pattern`).

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
        groups = group_tensors(tensors)
        keep = set(selection.select([n for n, _, _ in groups], where=path))
        tensors = {k: tensors[k] for n, w, m in groups if n in keep for k in (w, m) if k}
    patterns, skipped = patterns_from_tensors(
        tensors, source=path, block=block, dense_above=selection.dense_above,
        skip_embeddings=skip_embeddings, explicit=selection.layers or ())
    if not patterns:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:6]) or "the file holds no tensor"
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        raise RegroupError(f"{path}: no usable layer: {why}{more}")
    return patterns, skipped


