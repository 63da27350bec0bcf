"""The canonical sparsity pattern of one weight tensor.

A :class:`Pattern` is a 2-D CSR matrix of the surviving positions (rows = output features,
columns = input features) with optional ``|weight|`` values, plus the original tensor shape.
Conv weights ``(out, in, kh, kw)`` flatten to ``(out, in*kh*kw)`` in C order, which is the
im2col layout, and :meth:`Pattern.unflatten` maps back exactly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .validation import RegroupError

__all__ = ["Pattern", "from_array", "from_sparse", "count_kept"]


@dataclass(frozen=True, eq=False)
class Pattern:
    """Sparsity pattern of one layer.

    Attributes
    ----------
    name : str
        Layer name (fully qualified name in a checkpoint, file stem otherwise).
    matrix : scipy.sparse.csr_matrix of shape (n_rows, n_cols), dtype float64
        One stored entry per surviving weight; ``data`` is ``|weight|`` when
        ``has_weights`` else 1. Indices are sorted and canonical.
    shape : tuple of int
        Shape of the original tensor (2-D or 4-D).
    has_weights : bool
        Whether ``matrix.data`` holds magnitudes rather than ones.
    """

    name: str
    matrix: sp.csr_matrix
    shape: tuple[int, ...]
    has_weights: bool

    @property
    def n_rows(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_cols(self) -> int:
        return self.matrix.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    @property
    def density(self) -> float:
        return self.nnz / float(self.n_rows * self.n_cols)

    def binary(self) -> sp.csr_matrix:
        """The pattern with every stored value 1 (float64)."""
        m = self.matrix.copy()
        m.data = np.ones_like(m.data)
        return m

    def unflatten(self, dense2d: np.ndarray) -> np.ndarray:
        """Reshape a ``(n_rows, n_cols)`` array back to the original tensor shape."""
        return np.asarray(dense2d).reshape(self.shape)

    def describe(self) -> str:
        return (f"layer {self.name!r} (shape {self.shape}, matrix "
                f"{self.n_rows}x{self.n_cols}, nnz {self.nnz})")


def _is_torch_tensor(x: Any) -> bool:
    # Never imports torch: if torch was not imported, x cannot be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any, what: str, name: str) -> np.ndarray:
    if _is_torch_tensor(x):
        x = x.detach().cpu()
        if x.is_sparse or x.layout != sys.modules["torch"].strided:
            x = x.to_dense()
        if x.dtype.is_floating_point and x.dtype not in (sys.modules["torch"].float32,
                                                         sys.modules["torch"].float64):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == object or np.issubdtype(arr.dtype, np.complexfloating) or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{what} of layer {name!r} must be a real numeric or boolean array. "
                        f"Got dtype {arr.dtype} instead.")
    return arr


def count_kept(x: Any, *, what: str = "weight", name: str = "weight") -> int:
    """The entries a dense weight or mask (``what``) keeps: its nonzeros, counted where
    it lies (a strided torch tensor by torch, with no float copy of a bf16 table).

    Raises
    ------
    RegroupError
        NaN or inf in it (whether such an entry is kept is unknown), worded as
        :func:`from_array` words it.
    TypeError
        A non-numeric array.
    """
    torch = sys.modules.get("torch")
    # torch counts these dtypes natively; others (float8, complex) go through numpy as
    # from_array reads them (float8 widened to float32, complex refused).
    native = () if torch is None else (torch.float16, torch.bfloat16, torch.float32,
                                       torch.float64, torch.bool, torch.uint8, torch.int8,
                                       torch.int16, torch.int32, torch.int64)
    if _is_torch_tensor(x) and x.layout == torch.strided and x.dtype in native:
        size, kept = x.numel(), int(x.count_nonzero())
        finite = (int(x.isfinite().count_nonzero()) if x.dtype.is_floating_point
                  else size)
    else:
        arr = _to_numpy(x, what, name)
        size, kept = arr.size, int(np.count_nonzero(arr))
        finite = (int(np.count_nonzero(np.isfinite(arr)))
                  if np.issubdtype(arr.dtype, np.inexact) else size)
    if finite != size:
        raise RegroupError(f"layer {name!r}: {what} contains NaN or inf "
                           f"({size - finite} values)")
    return kept


def _flatten_shape(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4:
        return shape[0], shape[1] * shape[2] * shape[3]
    raise RegroupError(f"layer {name!r} has a {len(shape)}-D shape {shape}; regroup takes 2-D "
                       f"(Linear) or 4-D (Conv2d) weights")


def from_array(weight: Any, *, name: str = "weight", mask: Any = None) -> Pattern:
    """Build a :class:`Pattern` from a dense weight and/or mask.

    Parameters
    ----------
    weight : array-like of shape (out, in) or (out, in, kh, kw), or None
        Weight values. Without ``mask`` its zeros are the pruned positions; a boolean
        ``weight`` is read as a mask with unknown magnitudes.
    name : str, default="weight"
        Layer name used in messages and results.
    mask : array-like of the same shape, optional
        Explicit mask (nonzero = kept), as stored by ``torch.nn.utils.prune``.

    Returns
    -------
    Pattern

    Raises
    ------
    RegroupError
        Wrong number of dimensions, mismatched shapes, or NaN/inf in the kept weights.
    """
    w = None if weight is None else _to_numpy(weight, "weight", name)
    m = None if mask is None else _to_numpy(mask, "mask", name)
    if w is None and m is None:
        raise TypeError(f"from_array needs a weight or a mask for layer {name!r}")
    if w is not None and w.dtype == np.bool_ and m is None:
        m, w = w, None
    ref = m if m is not None else w
    shape = tuple(int(s) for s in ref.shape)
    n, k = _flatten_shape(shape, name)
    if w is not None and m is not None and w.shape != m.shape:
        raise RegroupError(f"layer {name!r}: weight shape {w.shape} differs from mask shape "
                           f"{m.shape}")
    # Work on the native dtype and only on the kept entries: a float64 copy of a whole
    # 11008 x 4096 layer costs more than its partitioning by metis.
    if m is not None:
        m2 = m.reshape(n, k)
        if np.issubdtype(m2.dtype, np.floating) and not np.isfinite(m2).all():
            raise RegroupError(f"layer {name!r}: mask contains NaN or inf")
        keep = m2 != 0
    else:
        w2 = w.reshape(n, k)
        if np.issubdtype(w2.dtype, np.inexact):
            bad = int(w2.size - np.count_nonzero(np.isfinite(w2)))
            if bad:
                raise RegroupError(f"layer {name!r}: weight contains NaN or inf "
                                   f"({bad} values)")
        keep = w2 != 0
    # Row-major flat indices: each row's columns come sorted (1-D nonzero and a modulo
    # are several times faster than the 2-D nonzero).
    flat = np.flatnonzero(keep)
    per_row = np.count_nonzero(keep, axis=1)
    if w is not None:
        # (boolean indexing walks the same row-major order, faster than fancy indexing)
        kept = w.reshape(n, k)[keep].astype(np.float64, copy=False)   # a new array
        if m is not None:          # without a mask the whole weight was checked above
            finite = np.isfinite(kept)
            if not finite.all():
                raise RegroupError(f"layer {name!r}: kept weights contain NaN or inf "
                                   f"({int((~finite).sum())} values)")
        data = np.abs(kept, out=kept)
    else:
        data = np.ones(flat.size)
    del keep
    idx = np.int32 if max(flat.size, k) < 2**31 - 1 else np.int64
    cols = (flat % k).astype(idx) if flat.size < n * k else \
        np.tile(np.arange(k, dtype=idx), n)          # every entry kept
    indptr = np.zeros(n + 1, idx)
    np.cumsum(per_row, out=indptr[1:])
    mat = sp.csr_matrix((data, cols, indptr), shape=(n, k))
    mat.has_sorted_indices = True
    return Pattern(name=name, matrix=mat, shape=shape, has_weights=w is not None)


def from_sparse(matrix: Any, *, name: str = "weight", shape: tuple[int, ...] | None = None,
                has_weights: bool = False) -> Pattern:
    """Build a :class:`Pattern` from a scipy sparse matrix.

    Stored entries are the kept positions; their absolute values are the magnitudes when
    ``has_weights`` else they are replaced by 1. Explicit zeros count as kept positions.
    """
    if not sp.issparse(matrix):
        raise TypeError(f"from_sparse expects a scipy sparse matrix for layer {name!r}; "
                        f"Got {type(matrix).__name__} instead.")
    if matrix.ndim != 2:
        raise RegroupError(f"layer {name!r}: sparse matrix must be 2-D")
    mat = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    mat.sum_duplicates()
    mat.sort_indices()
    if has_weights:
        if not np.isfinite(mat.data).all():
            raise RegroupError(f"layer {name!r}: values contain NaN or inf")
        mat.data = np.abs(mat.data)
    else:
        mat.data = np.ones_like(mat.data)
    shape = tuple(mat.shape) if shape is None else tuple(int(s) for s in shape)
    if _flatten_shape(shape, name) != mat.shape:
        raise RegroupError(f"layer {name!r}: shape {shape} does not flatten to "
                           f"{mat.shape}")
    return Pattern(name=name, matrix=mat, shape=shape, has_weights=has_weights)
