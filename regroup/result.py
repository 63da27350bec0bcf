"""Result files: the layouts of one run, stored so they are never recomputed.

A result file is a zip archive (``.npz`` compatible) written deterministically: fixed entry
order and timestamps, so the same input and seed give byte-identical files. Wall-clock
times are not stored (they live in the JSON report).

Layout of the archive (format version 1)::

    meta.json                 format_version, regroup and tool versions, run options,
                              and per layer: name, shape, block_shape, format, method,
                              params, seed, metrics, array entry prefix
    layers/<i>/mask.npy       bool, the refilled mask in ORIGINAL coordinates and shape
    layers/<i>/row_perm.npy   intp, row_perm[i] = original row at regrouped position i
    layers/<i>/col_perm.npy   intp (grid), col_perm[j] = original column at position j
    layers/<i>/panel_ptr.npy  intp (shuffled), panel p's kept columns are
    layers/<i>/panel_cols.npy   panel_cols[panel_ptr[p]:panel_ptr[p+1]], tile after tile
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._atomic import atomic_write
from ._validation import FormatError
from ._zip import ZipWriter, raw_entry

__all__ = ["LayerResult", "save_result", "load_result", "layer_record", "assemble_result",
           "read_meta", "damaged_part", "FORMAT_VERSION"]

FORMAT_VERSION = 1


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
        ``row_perm[i]`` is the original (flattened) row at regrouped position ``i``.
    col_perm : ndarray of intp or None
        Grid format: ``col_perm[j]`` is the original column at regrouped position ``j``.
    panel_cols : tuple of ndarray of intp, or None
        Shuffled format: the original columns kept by each row panel, tile after tile.
    block_shape : (int, int)
    format : {"grid", "shuffled"}
    method : str
        The method asked for (e.g. ``"auto"``); ``metrics["chosen"]`` names the winner.
    params : dict
    seed : int
    metrics : dict
        See :mod:`regroup.metrics`.
    seconds : float or None
        Wall-clock time of the layer (not stored in result files).
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

    @property
    def mask2d(self) -> np.ndarray:
        """The mask flattened to the regrouped matrix's (rows, cols) orientation."""
        return self.mask.reshape(self.shape[0], -1)

    def regrouped_mask(self) -> np.ndarray:
        """The mask in regrouped coordinates: ``mask2d[row_perm][:, col_perm]`` (grid) or
        rows permuted only (shuffled)."""
        m = self.mask2d[self.row_perm]
        return m[:, self.col_perm] if self.col_perm is not None else m


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def layer_record(r: LayerResult, prefix: str = "") -> dict:
    """The JSON record of one layer in a result file's meta.json (``prefix``: its array
    entries' directory)."""
    return {"name": r.name, "shape": list(r.shape), "block_shape": list(r.block_shape),
            "format": r.format, "method": r.method, "params": r.params, "seed": r.seed,
            "metrics": r.metrics, "entry": prefix}


def save_result(path: str | os.PathLike, layers: list[LayerResult],
                meta: Mapping[str, Any] | None = None) -> None:
    """Write ``layers`` to ``path`` atomically (temporary file, then rename).

    ``meta`` is stored as run information (options, tool versions, skipped layers).
    """
    doc = {**(meta or {}), "format_version": FORMAT_VERSION,
           "layers": [layer_record(r, f"layers/{i}/") for i, r in enumerate(layers)]}
    with atomic_write(path, "wb") as f, ZipWriter(f) as zw:
        zw.write("meta.json", json.dumps(doc, indent=1, sort_keys=True).encode())
        for i, r in enumerate(layers):
            pre = f"layers/{i}/"
            zw.write(pre + "mask.npy", _npy_bytes(np.asarray(r.mask, dtype=bool)))
            zw.write(pre + "row_perm.npy", _npy_bytes(r.row_perm.astype(np.int64)))
            if r.col_perm is not None:
                zw.write(pre + "col_perm.npy", _npy_bytes(r.col_perm.astype(np.int64)))
            if r.panel_cols is not None:
                ptr = np.concatenate([[0], np.cumsum([c.size for c in r.panel_cols])])
                cols = (np.concatenate(r.panel_cols) if r.panel_cols else
                        np.zeros(0, np.int64))
                zw.write(pre + "panel_ptr.npy", _npy_bytes(ptr.astype(np.int64)))
                zw.write(pre + "panel_cols.npy", _npy_bytes(cols.astype(np.int64)))


def read_meta(path: str | os.PathLike) -> dict | None:
    """The meta.json of a result file, or None when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as zf:
            doc = json.loads(zf.read("meta.json"))
        return doc if isinstance(doc, dict) else None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None


def damaged_part(part, layer: str, why: Exception | str) -> FormatError:
    """The error for a one-layer part file that cannot be read back."""
    return FormatError(f"{part}: the finished part of layer {layer!r} is damaged ({why}); "
                       "delete it and run again to recompute that layer")


def assemble_result(out: str | os.PathLike, parts: list[str | os.PathLike],
                    names: list[str], meta: Mapping[str, Any]) -> list[dict]:
    """Write the result file ``out`` from one-layer result files (``parts``, holding the
    layers ``names``), one array at a time; the bytes equal :func:`save_result` of the
    same layers. The parts' arrays are copied as they are compressed, each checked against
    its CRC on the way; a damaged part raises :class:`FormatError` naming it and its layer.
    Returns the layers' records."""
    layer_docs = []
    for i, p in enumerate(parts):
        doc = read_meta(p)
        if doc is None or not doc.get("layers"):
            raise damaged_part(p, names[i], "no readable layer record")
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
                fp = open(p, "rb")
            except OSError as exc:
                raise damaged_part(p, names[i], exc) from None
            with fp:
                try:
                    infos = zipfile.ZipFile(fp).infolist()
                except (OSError, zipfile.BadZipFile) as exc:
                    raise damaged_part(p, names[i], exc) from None
                for info in infos:
                    if not info.filename.startswith("layers/0/"):
                        continue
                    # The deflate stream is copied, not recompressed: the bytes equal
                    # save_result's, which compressed the same array the same way.
                    try:
                        zw.write_raw(f"layers/{i}/" + info.filename[len("layers/0/"):],
                                     info.CRC, info.file_size, info.compress_size,
                                     raw_entry(fp, info))
                    except FormatError as exc:
                        raise damaged_part(p, names[i], exc) from None
    return layer_docs


class ResultFile(dict):
    """Mapping of layer name to :class:`LayerResult`, with the run information in ``meta``."""

    meta: dict


def _read_npy(zf: zipfile.ZipFile, name: str, path) -> np.ndarray:
    try:
        with zf.open(name) as f:
            return np.lib.format.read_array(io.BytesIO(f.read()), allow_pickle=False)
    except KeyError:
        raise FormatError(f"{path}: result file lacks entry {name!r}") from None
    except (ValueError, zipfile.BadZipFile, OSError) as exc:   # BadZipFile: a bad CRC
        raise FormatError(f"{path}: entry {name!r} is not a valid array: {exc}") from None


def load_result(path: str | os.PathLike) -> ResultFile:
    """Load a result file written by :func:`save_result` (or ``regroup run``).

    Returns
    -------
    ResultFile
        A dict from layer name to :class:`LayerResult`; ``.meta`` holds the run information.

    Raises
    ------
    FileNotFoundError, FormatError
    """
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise FormatError(f"{path}: not a regroup result file (not a zip archive)") from None
    with zf:
        try:
            doc = json.loads(zf.read("meta.json"))
        except KeyError:
            raise FormatError(f"{path}: not a regroup result file (no meta.json)") from None
        except (json.JSONDecodeError, zipfile.BadZipFile) as exc:
            raise FormatError(f"{path}: corrupt meta.json: {exc}") from None
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(f"{path}: result format version {version!r} is not supported "
                              f"(this regroup reads version {FORMAT_VERSION})")
        out = ResultFile()
        for lm in doc["layers"]:
            pre = lm["entry"]
            has_panels = lm["format"] == "shuffled"
            panel_cols = None
            if has_panels:
                ptr = _read_npy(zf, pre + "panel_ptr.npy", path)
                cols = _read_npy(zf, pre + "panel_cols.npy", path).astype(np.intp)
                panel_cols = tuple(cols[a:b] for a, b in zip(ptr[:-1], ptr[1:]))
            out[lm["name"]] = LayerResult(
                name=lm["name"], shape=tuple(lm["shape"]),
                mask=_read_npy(zf, pre + "mask.npy", path),
                row_perm=_read_npy(zf, pre + "row_perm.npy", path).astype(np.intp),
                col_perm=None if has_panels else
                _read_npy(zf, pre + "col_perm.npy", path).astype(np.intp),
                panel_cols=panel_cols, block_shape=tuple(lm["block_shape"]),
                format=lm["format"], method=lm["method"], params=lm["params"],
                seed=lm["seed"], metrics=lm["metrics"])
        out.meta = {k: v for k, v in doc.items() if k != "layers"}
        return out
