"""DLMC ``.smtx``: ``nrows, ncols, nnz`` / CSR row offsets / column indices, pattern only."""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from .._atomic import atomic_write
from ..validation import FormatError, open_regular

__all__ = ["parse_smtx", "read_smtx", "write_smtx", "generate_smtx"]


def _ints(line: str, source: str, lineno: int) -> np.ndarray:
    tokens = line.split()
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        for match in re.finditer(r"\S+", line):
            try:
                int(match.group())
            except ValueError:
                raise FormatError(f"{source}:{lineno}:{match.start() + 1}: expected an "
                                  f"integer, found {match.group()[:20]!r}") from None
        raise FormatError(f"{source}:{lineno}: integer out of range") from None


def parse_smtx(lines: Iterable[str], *, source: str = "<smtx>",
               max_elements: int | None = None) -> sp.csr_matrix:
    """Parse the three lines of an ``.smtx`` file into a CSR pattern (data = 1.0).

    Raises
    ------
    FormatError
        With ``source:line:col`` for malformed headers, offsets or indices.
    """
    it = iter(lines)
    head = next(it, None)
    if head is None or not head.strip():
        raise FormatError(f"{source}:1: empty file, expected 'nrows, ncols, nnz'")
    if head.count(",") != 2:
        raise FormatError(f"{source}:1:1: expected 'nrows, ncols, nnz', found "
                          f"{head.strip()[:40]!r}")
    hdr = _ints(head.replace(",", " "), source, 1)
    if hdr.size != 3:
        raise FormatError(f"{source}:1:1: expected 'nrows, ncols, nnz', found "
                          f"{head.strip()[:40]!r}")
    n, m, nnz = (int(v) for v in hdr)
    if n < 0 or m < 0 or nnz < 0:
        raise FormatError(f"{source}:1: negative size in header {n}, {m}, {nnz}")
    if n == 0 or m == 0:
        # refused before scipy builds a rows + 1 long index for a layer with no element
        raise FormatError(f"{source}:1: declared shape {n}x{m} holds no element")
    if max_elements is not None and n * m > max_elements:
        raise FormatError(f"{source}:1: declared shape {n}x{m} exceeds the limit of "
                          f"{max_elements} elements")
    if nnz > n * m:
        raise FormatError(f"{source}:1: nnz {nnz} exceeds nrows*ncols = {n * m}")
    offsets_line = next(it, None)
    if offsets_line is None:
        raise FormatError(f"{source}:2: file ends before the row offsets (truncated?)")
    indptr = _ints(offsets_line, source, 2)
    if indptr.size != n + 1:
        raise FormatError(f"{source}:2: expected {n + 1} row offsets, found {indptr.size}")
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        bad = int(np.argmax(np.diff(indptr) < 0)) + 2 if np.any(np.diff(indptr) < 0) else 1
        raise FormatError(f"{source}:2: row offsets must rise from 0 to nnz={nnz} "
                          f"(problem at offset {bad})")
    idx_line = next(it, None) if nnz else (next(it, None) or "")
    if idx_line is None:
        raise FormatError(f"{source}:3: file ends before the column indices (truncated?)")
    indices = _ints(idx_line, source, 3)
    if indices.size != nnz:
        raise FormatError(f"{source}:3: expected {nnz} column indices, found {indices.size}"
                          + (" (truncated?)" if indices.size < nnz else ""))
    if nnz and (indices.min() < 0 or indices.max() >= m):
        bad = int(np.argmax((indices < 0) | (indices >= m)))
        raise FormatError(f"{source}:3: column index {int(indices[bad])} (entry {bad}) is "
                          f"outside [0, {m})")
    extra = next(it, None)
    if extra is not None and extra.strip():
        raise FormatError(f"{source}:4: unexpected content after the column indices")
    mat = sp.csr_matrix((np.ones(nnz), indices, indptr), shape=(n, m))
    if mat.has_canonical_format is False:
        mat.sum_duplicates()
    if mat.nnz != nnz:
        raise FormatError(f"{source}:3: duplicate column indices within a row")
    mat.sort_indices()
    return mat


def read_smtx(path: str | os.PathLike, *, max_elements: int | None = None,
              data: bytes | None = None) -> sp.csr_matrix:
    """Read an ``.smtx`` file (see :func:`parse_smtx`): from ``path`` (a regular file
    only), or from its bytes ``data`` already read (``path`` then names it in errors)."""
    raw = open_regular(path, ".smtx file") if data is None else io.BytesIO(data)
    with io.TextIOWrapper(raw, encoding="ascii", errors="strict") as f:
        try:
            return parse_smtx(f, source=os.fspath(path), max_elements=max_elements)
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: not a text .smtx file ({exc.reason} at byte "
                              f"{exc.start})") from None


def generate_smtx(matrix: sp.spmatrix):
    """Yield the three lines of ``matrix``'s pattern in ``.smtx`` format."""
    csr = sp.csr_matrix(matrix)
    csr.sort_indices()
    n, m = csr.shape
    yield f"{n}, {m}, {csr.nnz}"
    yield " ".join(map(str, csr.indptr.tolist()))
    yield " ".join(map(str, csr.indices.tolist()))


def write_smtx(matrix: sp.spmatrix, path: str | os.PathLike) -> None:
    """Write ``matrix``'s pattern as ``.smtx`` (atomically)."""
    with atomic_write(path) as f:
        for line in generate_smtx(matrix):
            f.write(line + "\n")
