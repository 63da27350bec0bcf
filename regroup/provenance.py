"""Provenance: what produced a result - tool versions and the hashes of its inputs.

Result files record the versions of the libraries that can shape a layout and the
SHA-256 of the input; resumable runs key each finished layer by the hash of its own
input tensors (:func:`tensor_digest`), so a changed input is never mistaken for a done one.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from .validation import RegroupError, open_regular

__all__ = ["TOOLS", "tool_versions", "file_sha256", "file_record", "FileRecord",
           "file_stamp", "tensor_bytes", "update_digest", "options_key"]

TOOLS = ("regroup", "numpy", "scipy", "pymetis", "kahypar", "mtkahypar", "fastcluster",
         "torch")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of regroup and the libraries that can shape a result."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: str | os.PathLike, what: str = "input") -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (a regular file only: a FIFO or
    device is refused before it is opened, :func:`regroup.validation.open_regular`)."""
    return file_record(path, what).sha256


class FileRecord(NamedTuple):
    """What identifies an input file's state: recorded when a source is opened and
    compared before its result is written (:func:`file_record`)."""

    size: int
    mtime_ns: int
    inode: int
    device: int
    sha256: str

    def stamp(self) -> tuple[int, int, int, int]:
        """``(size, mtime_ns, inode, device)``: what ``os.stat`` tells without reading."""
        return self.size, self.mtime_ns, self.inode, self.device


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """``(size, mtime_ns, inode, device)`` of a ``stat`` result."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def sha256_rest(f: BinaryIO, h: Any | None = None) -> Any:
    """Feed the rest of the open binary file ``f`` into ``h`` (a new SHA-256 when None),
    in 1 MiB chunks; returns ``h``."""
    h = hashlib.sha256() if h is None else h
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h


def checked_record(f: BinaryIO, path: str | os.PathLike, before: os.stat_result,
                   digest: str) -> FileRecord:
    """The :class:`FileRecord` of ``path`` read through the handle ``f``, whose
    ``fstat`` was ``before`` when the reading began: a file that changed while it was
    read (size, modification time) is a :class:`RegroupError`."""
    after = os.fstat(f.fileno())
    if file_stamp(after) != file_stamp(before):
        raise RegroupError(f"{os.fspath(path)}: the input changed while it was read; "
                           "run again once it is complete")
    return FileRecord(*file_stamp(after), digest)


def file_record(path: str | os.PathLike, what: str = "input") -> FileRecord:
    """Size, modification time, inode, device and SHA-256 of the regular file ``path``,
    read once through one handle (:func:`checked_record`)."""
    with open_regular(path, what) as f:
        before = os.fstat(f.fileno())
        return checked_record(f, path, before, sha256_rest(f).hexdigest())


def tensor_bytes(v: Any) -> tuple[str, list[int], bytes]:
    """dtype, shape and raw bytes of an in-memory tensor (numpy, torch incl. bf16, or a
    Pattern read from a sparse file), as hashed by :func:`update_digest`."""
    if hasattr(v, "matrix"):                     # a Pattern (.smtx / .mtx input)
        m = v.matrix.tocsr()
        return "csr", list(m.shape), m.indptr.tobytes() + m.indices.tobytes() + m.data.tobytes()
    if hasattr(v, "detach"):                     # torch: bytes through a uint8 view
        import torch                             # already loaded: it made the tensor
        t = v.detach().cpu().contiguous()
        return str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()
    a = np.ascontiguousarray(v)
    return str(a.dtype), list(a.shape), a.tobytes()


def update_digest(h: Any, name: str, dtype: str, shape: Any, raw: bytes) -> None:
    """Feed one named tensor into the hashlib object ``h`` (the layer-input hash; the
    safetensors reader feeds its tensors the same way straight from the file)."""
    h.update(f"{name}|{dtype}|{list(shape)}|".encode())
    h.update(raw)


def options_key(record: dict[str, Any]) -> str:
    """SHA-256 of a run's recorded options (and whatever else the caller adds, such as
    the regroup version): finished layers are reused only under the same key."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                          ).hexdigest()
