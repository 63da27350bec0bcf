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
from typing import Any

import numpy as np

__all__ = ["TOOLS", "tool_versions", "file_sha256", "tensor_bytes", "update_digest",
           "options_key"]

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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
