"""MatrixMarket (``.mtx``), read by a strict parser of regroup's own.

scipy's reader crashed the process (segmentation fault) on corrupted files in our fuzzing,
so files from outside are parsed here: ``coordinate`` (``real``, ``integer``, ``pattern``;
``general``, ``symmetric``, ``skew-symmetric``) and ``array`` (``real``, ``integer``;
``general``). Errors carry ``path:line``.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from ..validation import FormatError, open_regular

__all__ = ["parse_mtx", "read_mtx"]

# No weight matrix has a side this long (vocabularies are ~256k); a declared one is refused
# before its index is allocated.
MAX_SIDE = 1 << 24

FIELDS = ("real", "integer", "pattern")
SYMMETRIES = ("general", "symmetric", "skew-symmetric")


def _numbers(text: str, dtype, source: str, lineno: int) -> np.ndarray:
    try:
        return np.array(text.split(), dtype=dtype)
    except (ValueError, OverflowError):
        raise FormatError(f"{source}:{lineno}: expected numbers, found "
                          f"{text.strip()[:40]!r}") from None


def parse_mtx(lines: Iterable[str], *, source: str = "<mtx>",
              max_elements: int | None = None) -> tuple[sp.csr_matrix, bool]:
    """Parse MatrixMarket text. Returns ``(matrix, has_values)``; a ``pattern`` file has
    no values (every stored entry is 1)."""
    it = iter(lines)
    head = next(it, None)
    if head is None:
        raise FormatError(f"{source}:1: empty file, expected a %%MatrixMarket header")
    parts = head.lower().split()
    if len(parts) != 5 or parts[0] != "%%matrixmarket" or parts[1] != "matrix":
        raise FormatError(f"{source}:1: expected '%%MatrixMarket matrix <format> <field> "
                          f"<symmetry>', found {head.strip()[:60]!r}")
    fmt, field, symmetry = parts[2:]
    if fmt not in ("coordinate", "array") or field not in FIELDS or symmetry not in SYMMETRIES \
            or (fmt == "array" and (field == "pattern" or symmetry != "general")):
        raise FormatError(f"{source}:1: unsupported MatrixMarket type {fmt} {field} "
                          f"{symmetry} (supported: coordinate real/integer/pattern "
                          "general/symmetric/skew-symmetric, array real/integer general)")
    lineno, size_line = 1, None
    for line in it:
        lineno += 1
        if line.strip() and not line.lstrip().startswith("%"):
            size_line = line
            break
    if size_line is None:
        raise FormatError(f"{source}:{lineno}: file ends before the size line (truncated?)")
    size = _numbers(size_line, np.int64, source, lineno)
    if size.size != (3 if fmt == "coordinate" else 2) or np.any(size < 0):
        raise FormatError(f"{source}:{lineno}: bad size line {size_line.strip()[:40]!r}")
    n, m = int(size[0]), int(size[1])
    if n == 0 or m == 0:
        # refused before scipy builds a rows + 1 long index for a layer with no element
        raise FormatError(f"{source}:{lineno}: declared shape {n}x{m} holds no element")
    if max_elements is not None and n * m > max_elements:
        raise FormatError(f"{source}:{lineno}: declared shape {n}x{m} exceeds the limit of "
                          f"{max_elements} elements")
    if max(n, m) > MAX_SIDE:
        # A coordinate file declares its shape, not its size: scipy would build an index of
        # max(n, m) + 1 entries (8 GB for 1e9x1) before regroup sees the layer.
        raise FormatError(f"{source}:{lineno}: declared shape {n}x{m} has a side longer "
                          f"than {MAX_SIDE} (regroup.io.mtx.MAX_SIDE)")
    body = "".join(line for line in it if not line.lstrip().startswith("%"))
    values = _numbers(body, np.float64, source, lineno + 1)
    if fmt == "array":
        if values.size != n * m:
            raise FormatError(f"{source}: expected {n * m} values, found {values.size}")
        if not np.isfinite(values).all():
            raise FormatError(f"{source}: values contain NaN or inf")
        dense = values.reshape(m, n).T           # column-major
        mat = sp.csr_matrix(dense)
        return mat, True
    nnz = int(size[2])
    width = 2 if field == "pattern" else 3
    if nnz > n * m or values.size != nnz * width:
        raise FormatError(f"{source}: expected {nnz} entries of {width} numbers, found "
                          f"{values.size} numbers" + (" (truncated?)"
                                                      if values.size < nnz * width else ""))
    entries = values.reshape(nnz, width)
    rows, cols = entries[:, 0], entries[:, 1]
    if np.any(rows != np.round(rows)) or np.any(cols != np.round(cols)) or nnz and (
            rows.min() < 1 or rows.max() > n or cols.min() < 1 or cols.max() > m):
        raise FormatError(f"{source}: entry indices must be integers in [1, {n}] x [1, {m}]")
    data = np.ones(nnz) if field == "pattern" else entries[:, 2]
    if not np.isfinite(data).all():
        raise FormatError(f"{source}: values contain NaN or inf")
    r, c = rows.astype(np.int64) - 1, cols.astype(np.int64) - 1
    if symmetry != "general":
        off = r != c
        sign = -1.0 if symmetry == "skew-symmetric" else 1.0
        r, c, data = (np.concatenate([r, c[off]]), np.concatenate([c, r[off]]),
                      np.concatenate([data, sign * data[off]]))
    mat = sp.csr_matrix((data, (r, c)), shape=(n, m))
    mat.sum_duplicates()
    return mat, field != "pattern"


def read_mtx(path: str | os.PathLike, *, max_elements: int | None = None,
             data: bytes | None = None) -> tuple[sp.csr_matrix, bool]:
    """Read a ``.mtx`` file (see :func:`parse_mtx`): from ``path`` (a regular file only),
    or from its bytes ``data`` already read (``path`` then names it in errors)."""
    raw = open_regular(path, ".mtx file") if data is None else io.BytesIO(data)
    try:
        with io.TextIOWrapper(raw, encoding="ascii") as f:
            return parse_mtx(f, source=os.fspath(path), max_elements=max_elements)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not a text MatrixMarket file ({exc.reason} at byte "
                          f"{exc.start})") from None
