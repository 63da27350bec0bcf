"""Block-sparse Linear and Conv2d modules that run a regrouped layout.

A layer's weight is stored as the values of its kept blocks in regrouped coordinates,
plus the layout (which blocks, which rows and columns). The forward pass gathers the input
columns into the regrouped order (skipped when the permutation was folded into the
previous layer, i.e. is the identity), multiplies by the blocks, and scatters the output
rows back to the original order (skipped likewise).

Execution paths (``backend``):

- ``"bsr"``: ``torch.mm`` on a ``torch.sparse_bsr_tensor``. On CUDA this is torch's
  Triton block-sparse kernel (fp16/bf16/fp32, square blocks >= 16 and powers of two); on
  CPU its BSR kernel (fp32/fp64, square blocks). The shuffled format runs the same
  product on its gathered column tiles (tile ``t`` is block column ``t``).
- ``"triton"`` (shuffled format, CUDA): regroup's Triton kernel reads each tile's columns
  of the input in place (:mod:`.triton_shuffled`); blocks >= 16, powers of two.
- ``"dense"``: the masked weight as a dense matrix in original coordinates: ``F.linear``
  / ``F.conv2d``, no permutation at all.
- ``"auto"`` (default): the first call for each (device, dtype, batch size class, other
  dims, grad mode) times every available path on that very input, the paths interleaved,
  within :data:`TIME_BUDGET` seconds per module and input class (``module.core.time_budget``
  overrides it; at least a warm-up and one timed call of each path). A sparse path is
  chosen only when it beat dense by the :data:`MARGIN` (5 %) in that timing, so the choice
  is never a path measured slower than dense. In inference (grad disabled) every
  :data:`CHECK_EVERY`-th call of a sparse choice is timed; when the best of the last
  :data:`CHECK_SAMPLES` such calls is slower than the dense time of the choice by more
  than the margin, the paths are timed again and the choice replaced (checks then back
  off while the choice holds). Each timing is logged at INFO on this module's logger
  (``regroup.adapters.torch.sparse``) with the measured times. The choices are in
  ``module.dispatch_log``, the measurements in ``module.dispatch_records``.

Tracing (``torch.export``, ``torch.jit.trace``) times nothing: the
BSR product runs as the registered op ``torch.ops.regroup.bsr_mm`` (traceable; importing
``regroup.adapters.torch`` registers it, also where an exported program is loaded), the
dense path rebuilds the weight from the block values inside the graph. ``"auto"`` uses
the path measured for that input class by an earlier eager call (run the model once on
an example input before exporting), else dense with a warning; a measured ``"triton"``
becomes ``"bsr"`` (or dense) with a warning. An explicit ``"triton"`` cannot be traced
(:class:`~regroup.RegroupError`); :func:`set_backend` picks a path for a whole model.

The state dict of a block core holds its layout as persistent buffers, so a converted
model saves and reloads without its plan (:func:`~regroup.adapters.torch.load_block_sparse`):
``layout`` (int64 ``[version, format (0 grid, 1 shuffled), br, bc, rows, cols]``),
``row_perm`` (``row_perm[i]`` is the original row at regrouped row ``i``), ``col_gather``
(gathered input column ``j`` reads original column ``col_gather[j]``; ``cols`` is the
zero padding), ``block_row`` / ``block_col`` (the kept blocks, in storage order) and
``values`` (n_blocks, br, bc).

Gradients flow to the input and to the block values (``module.values``), so the modules
train; the gradient of a BSR product is computed with the transposed layout because
torch's BSR matmul has no backward for a sparse weight.

:class:`BlockSparseMultiheadAttention` replaces an ``nn.MultiheadAttention`` whose packed
``in_proj_weight`` (q|k|v rows) and/or ``out_proj`` are regrouped: the projections run as
:class:`BlockSparseLinear`, the attention itself through
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regroup import RegroupError, check_layout
from regroup.blocks import positions
from regroup.result import LayerResult

from . import triton_shuffled
from .masking import read_mask, unmasked, write_mask

__all__ = ["BlockSparseLinear", "BlockSparseConv2d", "BlockSparseMultiheadAttention",
           "DispatchRecord", "set_backend", "stored_result", "time_paths", "dispatch_key",
           "describe_key", "BACKENDS", "MARGIN", "TIME_BUDGET", "CHECK_EVERY",
           "CHECK_SAMPLES", "LAYOUT_KEYS", "LAYOUT_VERSION"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "bsr", "triton", "dense")
#: A sparse path is chosen by "auto" only when its time is below MARGIN x dense's.
MARGIN = 0.95
#: Seconds "auto" may spend timing the paths of one module for one input class.
TIME_BUDGET = 0.2
#: In inference, every CHECK_EVERY-th call of a sparse choice is timed against dense ...
CHECK_EVERY = 64
#: ... and the choice is re-timed when the best of the last CHECK_SAMPLES is too slow.
CHECK_SAMPLES = 3
_MAX_ROUNDS, _MAX_EVERY = 30, 4096
#: The clock of every timing (a test replaces it).
_clock: Callable[[], float] = time.perf_counter
#: The persistent layout buffers of a block core (with ``values``, its state dict).
LAYOUT_KEYS = ("layout", "row_perm", "col_gather", "block_row", "block_col")
LAYOUT_VERSION = 1
_FORMATS = ("grid", "shuffled")


def _tracing() -> bool:
    """Whether this call is being traced (torch.export, torch.compile, torch.jit.trace)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _index(perm: np.ndarray) -> torch.Tensor | None:
    """The permutation as a long tensor, or None when it is the identity (nothing to do)."""
    perm = np.asarray(perm, np.int64)
    return None if np.array_equal(perm, np.arange(perm.size)) else torch.from_numpy(perm)


def _bsr(crow, col, values, size) -> torch.Tensor:
    # Indices are built here and valid by construction; torch warns once that BSR is beta.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(crow, col, values, size=size, check_invariants=False)


class _BsrMatmul(torch.autograd.Function):
    """``W @ xt`` for the BSR ``W`` of a block core (padded, regrouped coordinates) and a
    dense ``xt`` (cols, batch), with the backward torch lacks for a sparse weight."""

    @staticmethod
    def forward(ctx, xt, values, core):
        ctx.save_for_backward(xt, values)
        ctx.core = core
        return torch.mm(_bsr(core.crow, core.col, values, core.padded), xt)

    @staticmethod
    def backward(ctx, gy):
        xt, values = ctx.saved_tensors
        core = ctx.core
        gx = gv = None
        if ctx.needs_input_grad[0]:
            wt = _bsr(core.crow_t, core.col_t, values[core.perm_t].transpose(1, 2).contiguous(),
                      core.padded[::-1])
            gx = torch.mm(wt, gy.contiguous())
        if ctx.needs_input_grad[1]:
            br, bc = core.block
            gyb = gy.reshape(-1, br, gy.shape[1])[core.block_row]      # (nb, br, N)
            xb = xt.reshape(-1, bc, xt.shape[1])[core.block_col]       # (nb, bc, N)
            gv = torch.bmm(gyb, xb.transpose(1, 2))
        return gx, gv, None


@torch.library.custom_op("regroup::bsr_mm", mutates_args=())
def _bsr_mm(xt: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
            crow_t: torch.Tensor, col_t: torch.Tensor, perm_t: torch.Tensor,
            block_row: torch.Tensor, block_col: torch.Tensor, rows: int) -> torch.Tensor:
    """``W @ xt`` for the BSR ``W`` (rows, xt.shape[0]) of ``crow`` / ``col`` / ``values``:
    the traceable form of :class:`_BsrMatmul` (opaque to torch.export and torch.jit.trace;
    the transposed layout and block coordinates serve its backward)."""
    return torch.mm(_bsr(crow, col, values, (rows, xt.shape[0])), xt)


@_bsr_mm.register_fake
def _bsr_mm_fake(xt, values, crow, col, crow_t, col_t, perm_t, block_row, block_col, rows):
    return xt.new_empty((rows, xt.shape[1]))


def _bsr_mm_setup(ctx, inputs, output) -> None:
    xt, values, crow, col, crow_t, col_t, perm_t, block_row, block_col, rows = inputs
    ctx.save_for_backward(xt, values, crow, col, crow_t, col_t, perm_t, block_row, block_col)


def _bsr_mm_backward(ctx, gy):
    xt, values, crow, col, crow_t, col_t, perm_t, block_row, block_col = ctx.saved_tensors
    gx = gv = None
    if ctx.needs_input_grad[0]:
        # The transposed layout, whose own transpose is the original one.
        inv_t = torch.empty_like(perm_t).scatter_(0, perm_t, torch.arange(
            perm_t.numel(), device=perm_t.device))
        gx = torch.ops.regroup.bsr_mm(
            gy.contiguous(), values[perm_t].transpose(1, 2).contiguous(), crow_t, col_t,
            crow, col, inv_t, block_col[perm_t], col_t, xt.shape[0])
    if ctx.needs_input_grad[1]:
        br, bc = values.shape[1:]
        gyb = gy.reshape(-1, br, gy.shape[1])[block_row]
        xb = xt.reshape(-1, bc, xt.shape[1])[block_col]
        gv = torch.bmm(gyb, xb.transpose(1, 2))
    return gx, gv, None, None, None, None, None, None, None, None


_bsr_mm.register_autograd(_bsr_mm_backward, setup_context=_bsr_mm_setup)


@dataclass
class DispatchRecord:
    """What ``backend="auto"`` measured for one input class of one module.

    Attributes
    ----------
    path : str
        The chosen path.
    times : dict of str to float
        Best seconds per path in the timing that chose it (dense included).
    rounds : int
        Timed calls of each path (after one warm-up call each).
    seconds : float
        Wall-clock seconds the timing took.
    timings : int
        How many times this input class was timed (1 + re-timings).
    calls : int
        Calls of the chosen sparse path since the timing (inference only).
    every : int
        The current interval of the running check (doubles while the choice holds).
    samples : list of float
        The latest checked call times (at most :data:`CHECK_SAMPLES`).
    """

    path: str
    times: dict[str, float]
    rounds: int
    seconds: float
    timings: int = 1
    calls: int = 0
    every: int = CHECK_EVERY
    samples: list[float] = field(default_factory=list)


def _core_arrays(result: LayerResult, n: int, m: int) -> dict[str, Any]:
    """The index arrays of a block core for layout ``result`` of an (n, m) weight (checked):
    the persistent :data:`LAYOUT_KEYS`, the derived BSR indices, and ``padded``."""
    mask = np.asarray(result.mask2d, bool)
    if mask.shape != (n, m):
        raise RegroupError(f"layer {result.name!r}: layout shape {mask.shape} differs from "
                           f"the weight's {(n, m)}")
    check_layout(mask, result.format, result.block_shape, result.row_perm,
                 result.col_perm, result.panel_cols)
    br, bc = result.block_shape
    P = -(-n // br)
    row_perm = np.asarray(result.row_perm, np.int64)
    if result.format == "grid":
        Q = -(-m // bc)
        gather = np.concatenate([result.col_perm, np.full(Q * bc - m, m)]).astype(np.int64)
        R = np.zeros((P * br, Q * bc), bool)
        R[:n, :m] = mask[np.ix_(row_perm, result.col_perm)]
        kept = R.reshape(P, br, Q, bc).any(axis=(1, 3))
        block_row, block_col = np.nonzero(kept)                      # row-major order
    else:
        tiles = [(p, cols[t:t + bc]) for p, cols in enumerate(result.panel_cols)
                 for t in range(0, len(cols), bc)]
        gather = np.full(len(tiles) * bc, m, np.int64)
        for t, (_, cols) in enumerate(tiles):
            gather[t * bc:t * bc + len(cols)] = cols
        block_row = np.asarray([p for p, _ in tiles], np.int64)
        block_col = np.arange(len(tiles), dtype=np.int64)
        Q = len(tiles)
    counts_r = np.bincount(block_row, minlength=P)
    counts_c = np.bincount(block_col, minlength=Q)
    perm_t = np.lexsort((block_row, block_col))   # the transposed layout's block order
    identity = gather.size == m and np.array_equal(gather, np.arange(m)) and \
        result.format == "grid"
    return {"padded": (P * br, Q * bc),
            "layout": [LAYOUT_VERSION, _FORMATS.index(result.format), br, bc, n, m],
            "row_perm": row_perm, "col_gather": gather, "block_row": block_row,
            "block_col": block_col,
            "in_index": None if identity else gather, "out_index": _index(positions(row_perm)),
            "crow": np.concatenate([[0], np.cumsum(counts_r)]), "col": block_col,
            "crow_t": np.concatenate([[0], np.cumsum(counts_c)]),
            "col_t": block_row[perm_t], "perm_t": perm_t}


def _entry_positions(shape: tuple[int, int], block: tuple[int, int], padded: tuple[int, int],
                     row_perm: torch.Tensor, block_row: torch.Tensor, col_gather: torch.Tensor,
                     block_col: torch.Tensor, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`BlockCore._block_positions` of the given index buffers."""
    n, m = shape
    br, bc = block
    rows = torch.cat([row_perm, row_perm.new_full((padded[0] - n,), n)]).to(device)
    r = rows[block_row.to(device)[:, None] * br + torch.arange(br, device=device)]
    c = col_gather.to(device)[block_col.to(device)[:, None] * bc +
                              torch.arange(bc, device=device)]
    return r[:, :, None], c[:, None, :]


def _entry_keys(r: torch.Tensor, c: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per stored entry (flattened ``values`` order) of positions ``r``, ``c``
    (:func:`_entry_positions`), its dense position ``row * m + col``, or -1 where it is
    padding."""
    return torch.where((r < n) & (c < m), r * m + c, -1).reshape(-1)


#: The derived (non-persistent) index buffers of a block core.
_DERIVED_KEYS = ("in_index", "out_index", "crow", "col", "crow_t", "col_t", "perm_t")


class BlockCore(nn.Module):
    """The kept blocks of one weight matrix (rows x cols) and the products they allow.

    Both formats become one BSR matrix over a gathered input: grid gathers the columns in
    ``col_perm`` order (b x b blocks on a P x Q grid); shuffled gathers every kept tile's
    columns side by side, so tile ``t`` is block column ``t`` of its panel's block row.
    ``in_index`` (None when the identity) is that gather; index ``cols`` reads an appended
    zero column (padding of short tiles and edges). ``out_index`` puts rows back. The
    layout buffers (:data:`LAYOUT_KEYS`) are persistent, the others derived from them.
    :meth:`set_layout` moves the core to another layout with as many blocks, in place.
    """

    def __init__(self, result: LayerResult, weight2d: torch.Tensor, backend: str) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"The 'backend' parameter must be one of {BACKENDS}. Got "
                             f"{backend!r} instead.")
        n, m = weight2d.shape
        arrays = _core_arrays(result, n, m)
        self.name, self.format, self.block = result.name, result.format, tuple(result.block_shape)
        self.backend = backend
        self.time_budget = TIME_BUDGET
        self.shape = (n, m)
        self.padded = arrays["padded"]
        self.n_blocks = int(arrays["block_row"].size)
        for name in (*LAYOUT_KEYS, *_DERIVED_KEYS):
            arr = arrays[name]
            self.register_buffer(name, None if arr is None else torch.from_numpy(
                np.asarray(arr, np.int64)), persistent=name in LAYOUT_KEYS)
        self.values = nn.Parameter(self.from_dense(weight2d.detach()).contiguous().clone())
        self.dispatch_log: dict[tuple, str] = {}
        self.dispatch_records: dict[tuple, DispatchRecord] = {}
        self._dense_cache: tuple[Any, torch.Tensor] | None = None

    def _block_positions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per kept block, the original rows (n_blocks, br, 1) and columns (n_blocks, 1,
        bc) of its entries; ``rows`` / ``cols`` where they are padding."""
        return _entry_positions(self.shape, self.block, self.padded, self.row_perm,
                                self.block_row, self.col_gather, self.block_col, device)

    def from_dense(self, W: torch.Tensor) -> torch.Tensor:
        """The (n_blocks, br, bc) kept blocks of the (rows, cols) ``W`` (original
        coordinates) in this layout's storage order, zero in the padding. It reads only
        the kept positions."""
        r, c = self._block_positions(W.device)
        return F.pad(W, (0, 1, 0, 1))[r, c]

    def to_dense(self, v: torch.Tensor) -> torch.Tensor:
        """The (rows, cols) matrix, original coordinates, of blocks ``v`` (n_blocks, br,
        bc) in this layout (0 off the kept blocks): the inverse of :meth:`from_dense` on
        the kept positions, writing only those (:meth:`dense_weight` is this for
        ``values``, in the form its paths use)."""
        n, m = self.shape
        r, c = self._block_positions(v.device)
        out = v.new_zeros((n + 1, m + 1))
        out[r, c] = v                   # (padding goes to row n / column m, cut off)
        return out[:n, :m]

    @torch.no_grad()
    def set_layout(self, result: LayerResult, carry: tuple[torch.Tensor, ...] = ()) -> None:
        """Move to layout ``result`` (same shape, format, block and number of kept blocks),
        in place: the index buffers are rebuilt, and ``values`` (the same Parameter), its
        ``grad`` and every tensor of ``carry`` (values-shaped, e.g. optimizer state) are
        remapped through the dense positions: a position kept by both layouts keeps its
        entry, one new to ``result`` (or padding) gets 0. Each tensor is remapped on its
        own device.

        Raises
        ------
        RegroupError
            Another shape, format, block or block count, or an invalid layout; nothing is
            changed then.
        """
        arrays = _core_arrays(result, *self.shape)
        nb = int(arrays["block_row"].size)
        if (result.format, tuple(result.block_shape), nb) != (self.format, self.block,
                                                              self.n_blocks):
            raise RegroupError(
                f"layer {self.name!r}: set_layout needs a {self.format} layout of "
                f"{self.block[0]}x{self.block[1]} blocks keeping {self.n_blocks} of them; "
                f"got {result.format}, {tuple(result.block_shape)}, {nb} blocks")
        for t in carry:
            if tuple(t.shape) != tuple(self.values.shape):
                raise RegroupError(f"layer {self.name!r}: set_layout carries tensors of the "
                                   f"values' shape {tuple(self.values.shape)}, got "
                                   f"{tuple(t.shape)}")
        movers: list[torch.Tensor] = []
        for t in (self.values, *carry, self.values.grad):
            if t is not None and all(t is not u for u in movers):
                movers.append(t)
        dev = self.values.device
        buffers = {name: None if arrays[name] is None else
                   torch.from_numpy(np.asarray(arrays[name], np.int64)).to(dev)
                   for name in (*LAYOUT_KEYS, *_DERIVED_KEYS)}
        n, m = self.shape
        before = _entry_keys(*self._block_positions(dev), n, m)
        after = _entry_keys(*_entry_positions(
            self.shape, self.block, arrays["padded"], buffers["row_perm"],
            buffers["block_row"], buffers["col_gather"], buffers["block_col"], dev), n, m)
        # A lookup from each old entry's dense position to its storage index gives, per
        # new entry, the old entry holding it (-1: new to the layout, or padding): one
        # gather of the stored entries per tensor instead of a round trip through dense
        # (rows x cols) copies. int32 while the storage indices fit.
        index = torch.int32 if before.numel() < 2 ** 31 else torch.int64
        lookup = torch.full((n * m,), -1, dtype=index, device=dev)
        real = before >= 0
        lookup[before[real]] = torch.arange(before.numel(), dtype=index, device=dev)[real]
        src = torch.where(after >= 0, lookup[after.clamp(min=0)], -1).long()
        del lookup
        hit = src >= 0
        src = src.clamp(min=0)
        # Every tensor is remapped (on its own device) before anything is written, so a
        # failure while remapping leaves the core as it was.
        moved = []
        for t in movers:
            s_t, h_t = src.to(t.device), hit.to(t.device)
            moved.append(torch.where(h_t, t.reshape(-1)[s_t],
                                     torch.zeros((), dtype=t.dtype, device=t.device)))
        for name, buf in buffers.items():
            setattr(self, name, buf)
        self.padded = arrays["padded"]
        for t, new in zip(movers, moved):
            t.copy_(new.view_as(t))
        self._dense_cache = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The derived index buffers follow the layout this module was built with: a state
        # dict of another layout would leave them stale, so it is refused.
        for key in LAYOUT_KEYS:
            got = state_dict.get(prefix + key)
            if isinstance(got, torch.Tensor) and not (
                    got.shape == getattr(self, key).shape and
                    torch.equal(got.to(torch.int64).cpu(), getattr(self, key).cpu())):
                raise RegroupError(
                    f"layer {self.name!r}: the state dict's block layout ({prefix + key!r}) "
                    "differs from this module's; load it into a dense model of the "
                    "architecture with regroup.adapters.torch.load_block_sparse (in "
                    "RegroupDST(execution='block') training, load the sparsifier's state "
                    "dict first: it moves the modules to their saved layouts)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- paths ---------------------------------------------------------------------------
    def paths(self, x: torch.Tensor) -> list[str]:
        """The paths that can run ``x`` here, dense first."""
        br, bc = self.block
        if x.device.type == "cuda":
            ok = x.dtype in (torch.float16, torch.bfloat16, torch.float32) and br == bc and \
                br >= 16 and br & (br - 1) == 0
        else:
            ok = x.dtype in (torch.float32, torch.float64) and br == bc
        out = ["dense", "bsr"] if ok else ["dense"]
        pow2 = all(b >= 16 and b & (b - 1) == 0 for b in self.block)
        if self.format == "shuffled" and pow2 and triton_shuffled.available(x.device) and \
                x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            out.append("triton")
        return out

    def dense_weight(self) -> torch.Tensor:
        """The masked weight in original coordinates, shape (rows, cols)."""
        # Inference reuses the dense weight until the values change (in place or replaced);
        # a traced call rebuilds it in the graph, from the values.
        cache = not torch.is_grad_enabled() and not _tracing()
        key = (self.values._version, self.values.data_ptr(), self.values.device) \
            if cache else None
        if cache and self._dense_cache is not None and self._dense_cache[0] == key:
            return self._dense_cache[1]
        n, m = self.shape
        br, bc = self.block
        v = self.values
        P, Q = self.padded[0] // br, self.padded[1] // bc
        W = v.new_zeros((P, Q, br, bc)).index_put((self.block_row, self.block_col), v)
        W = W.permute(0, 2, 1, 3).reshape(self.padded)[:n]
        if self.in_index is not None:
            W = W.new_zeros((n, m + 1)).index_add(1, self.in_index, W)
        W = W[:, :m]
        if self.out_index is not None:
            W = W.index_select(0, self.out_index)
        W = W.contiguous()              # a column slice: GEMM on it would copy every call
        if cache:
            self._dense_cache = (key, W)
        return W

    def sparse_matmul(self, x: torch.Tensor, path: str = "bsr") -> torch.Tensor:
        """``x @ W.T`` for a 2-D ``x`` (batch, cols) through the BSR product or, for the
        shuffled format, the Triton tile kernel (``path="triton"``)."""
        n, m = self.shape
        if not self.n_blocks:               # no kept block: W is zero
            return x.new_zeros((x.shape[0], n)) + 0 * self.values.sum()
        if path == "triton":
            y = triton_shuffled.shuffled_matmul(x, self)[:, :n]
            return y if self.out_index is None else y.index_select(1, self.out_index)
        # Gathering rows of x.T copies contiguous runs: ~2x faster than columns of x.
        xt = x.t().contiguous()
        if self.in_index is not None:
            xt = F.pad(xt, (0, 0, 0, 1)).index_select(0, self.in_index)
        if _tracing():
            yt = torch.ops.regroup.bsr_mm(xt, self.values, self.crow, self.col, self.crow_t,
                                          self.col_t, self.perm_t, self.block_row,
                                          self.block_col, self.padded[0])[:n]
        else:
            yt = _BsrMatmul.apply(xt, self.values, self)[:n]
        if self.out_index is not None:
            yt = yt.index_select(0, self.out_index)
        return yt.t()

    # -- dispatch ------------------------------------------------------------------------
    def choose(self, x: torch.Tensor, run: Callable[[str], Any]) -> str:
        """The path for input ``x``: fixed by ``backend``, or measured once per class of
        inputs (``run(path)`` performs the whole forward on ``x``)."""
        return self._select(x, run)[0]

    def _select(self, x: torch.Tensor, run) -> tuple[str, DispatchRecord | None]:
        """:meth:`choose`, and the record of an eager auto choice (else None)."""
        paths = self.paths(x)
        if self.backend != "auto":
            if self.backend not in paths:
                raise RegroupError(
                    f"layer {self.name!r}: backend {self.backend!r} cannot run "
                    f"{x.dtype} on {x.device.type} with {self.block[0]}x{self.block[1]} "
                    f"blocks (available: {paths}); use backend='auto' or 'dense'")
            if self.backend == "triton" and _tracing():
                raise RegroupError(
                    f"layer {self.name!r}: backend 'triton' cannot be traced or exported "
                    "(its kernel is not a registered op); use backend 'bsr' or 'dense' "
                    "(regroup.adapters.torch.set_backend)")
            return self.backend, None
        key = dispatch_key(x)
        if _tracing():
            return self._traced_choice(key, paths), None
        rec = self.dispatch_records.get(key)
        if rec is None:
            rec = self._measure(key, run, paths, "first call")
        return rec.path, rec

    def dispatch(self, x: torch.Tensor, run: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """``run(path)`` on the path :meth:`choose` picks for ``x``; in inference, every
        ``every``-th call of a sparse choice is timed and a choice slower than the dense
        time recorded with it by more than the margin is timed again."""
        path, rec = self._select(x, run)
        if rec is None or path == "dense" or torch.is_grad_enabled():
            return run(path)
        rec.calls += 1
        if rec.calls % rec.every:
            return run(path)
        sync = _sync(x.device)
        sync()
        t0 = _clock()
        y = run(path)
        sync()
        rec.samples = [*rec.samples, _clock() - t0][-CHECK_SAMPLES:]
        if len(rec.samples) == CHECK_SAMPLES and min(rec.samples) * MARGIN > rec.times["dense"]:
            new = self._measure(dispatch_key(x), run, self.paths(x), (
                f"re-timed: {path} took {1e3 * min(rec.samples):.3g} ms at best in the last "
                f"{CHECK_SAMPLES} checks, dense {1e3 * rec.times['dense']:.3g} ms"))
            new.timings = rec.timings + 1
            new.every = min(2 * rec.every, _MAX_EVERY) if new.path == path else CHECK_EVERY
        return y

    def _measure(self, key: tuple, run, paths: list[str], why: str) -> DispatchRecord:
        times, rounds, seconds = time_paths(run, paths, self.time_budget, key[0])
        best = min((p for p in paths if p != "dense"), key=times.get, default="dense")
        # By construction: a sparse path only when it beat dense by the margin, measured
        # in the same interleaved rounds.
        choice = best if times[best] < MARGIN * times["dense"] else "dense"
        rec = DispatchRecord(choice, times, rounds, seconds)
        self.dispatch_records[key] = rec
        self.dispatch_log[key] = choice
        if logger.isEnabledFor(logging.INFO):
            logger.info("%s: %s for %s (%s; %s, %d rounds in %.1f ms, budget %.0f ms)",
                        self.name, choice, describe_key(key),
                        ", ".join(f"{p} {1e3 * t:.3g} ms" for p, t in times.items()), why,
                        rounds, 1e3 * seconds, 1e3 * self.time_budget)
        return rec

    def _traced_choice(self, key: tuple, paths: list[str]) -> str:
        # Nothing is timed while tracing: the path measured by an eager call of this input
        # class (any grad mode), else dense; said by a warning either way it changes.
        rec = self.dispatch_records.get(key) or next(
            (r for k, r in self.dispatch_records.items() if k[:4] == key[:4]), None)
        if rec is None:
            warnings.warn(
                f"layer {self.name!r}: backend 'auto' has no measured path for "
                f"{describe_key(key)} and times nothing while traced; the traced program uses "
                "the dense path. Run the model once on an example input before tracing, or "
                "choose a path with set_backend(model, 'bsr')", RuntimeWarning, stacklevel=2)
            return "dense"
        path = rec.path
        if path == "triton":
            path = "bsr" if "bsr" in paths else "dense"
            warnings.warn(f"layer {self.name!r}: the Triton path measured by 'auto' cannot be "
                          f"traced; the traced program uses {path!r}", RuntimeWarning,
                          stacklevel=2)
        logger.info("%s: traced with the %s path (measured by auto)", self.name, path)
        return path

    def extra_repr(self) -> str:
        return (f"format={self.format}, block={self.block[0]}x{self.block[1]}, "
                f"blocks={self.values.shape[0]}, backend={self.backend}")


def dispatch_key(x: torch.Tensor) -> tuple:
    """The input class a measured choice of path holds for: device, dtype, batch size
    class, other dims, grad mode."""
    # Batch sizes share a power-of-two class; the other dims (a conv's image size)
    # change the cost, so they are part of the key.
    return (x.device.type, x.dtype, 1 << max(0, math.ceil(math.log2(max(1, x.shape[0])))),
            tuple(x.shape[1:]), torch.is_grad_enabled())


def describe_key(key: tuple) -> str:
    """A dispatch key in words: ``input (<=8, 64) float32 on cpu, no grad``."""
    dims = ", ".join(map(str, (f"<={key[2]}", *key[3])))
    return (f"input ({dims}) {str(key[1]).removeprefix('torch.')} on {key[0]}, "
            f"{'grad' if key[4] else 'no grad'}")


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_paths(run: Callable[[str], Any], paths: list[str], budget: float,
               device: str = "cpu") -> tuple[dict[str, float], int, float]:
    """Best seconds per path, the paths interleaved so that a burst of load on the machine
    hits them alike: a warm-up and one timed call of each path, then more rounds (up to
    30) while the next round, at the best times so far, fits in ``budget`` seconds from
    the start. Returns (times, timed rounds, seconds spent)."""
    sync = _sync(torch.device(device))
    best = dict.fromkeys(paths, float("inf"))
    start = _clock()
    with torch.no_grad():
        for p in paths:                             # warm-up (and lazy init), timed once
            run(p)
            sync()
            t0 = _clock()
            run(p)
            sync()
            best[p] = _clock() - t0
        rounds = 1
        while rounds < _MAX_ROUNDS and _clock() - start + sum(best.values()) <= budget:
            for p in paths:
                t0 = _clock()
                run(p)
                sync()
                best[p] = min(best[p], _clock() - t0)
            rounds += 1
    return best, rounds, _clock() - start


def stored_result(name: str, state: Mapping[str, Any], shape: tuple[int, int]
                  ) -> LayerResult:
    """The layout of a block core stored in a state dict, checked, as a LayerResult.

    ``state`` maps the core's keys (:data:`LAYOUT_KEYS` and ``values``, without their
    module prefix) to tensors; ``shape`` is the (rows, cols) of the weight it is to
    replace. Nothing in ``state`` is trusted: every index is checked against the shape
    before it is used, and the mask must be a union of whole blocks
    (:func:`regroup.check_layout`).

    Raises
    ------
    RegroupError
        Naming layer ``name`` and what is wrong: a missing key, a dtype or shape, an index
        out of range, a permutation that is not one, repeated or unordered blocks, values
        of another shape.
    """
    def fail(msg: str) -> RegroupError:
        return RegroupError(f"layer {name!r}: {msg}")

    missing = [k for k in (*LAYOUT_KEYS, "values") if k not in state]
    if missing:
        raise fail(f"the stored block layout lacks {missing}")
    a: dict[str, np.ndarray] = {}
    for k in LAYOUT_KEYS:
        t = state[k]
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or \
                t.is_complex() or t.dtype == torch.bool:
            what = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) \
                else type(t).__name__
            raise fail(f"{k!r} must be a 1-D integer tensor, got {what}")
        a[k] = t.detach().cpu().numpy().astype(np.int64)
    if a["layout"].size != 6:
        raise fail(f"'layout' must hold 6 integers [version, format, br, bc, rows, cols], "
                   f"got {a['layout'].size}")
    version, code, br, bc, n, m = (int(v) for v in a["layout"])
    if version != LAYOUT_VERSION:
        raise fail(f"layout version {version}; this regroup reads version {LAYOUT_VERSION}")
    if code not in (0, 1):
        raise fail(f"format code {code} is not 0 (grid) or 1 (shuffled)")
    if (n, m) != tuple(shape):
        raise fail(f"the stored layout is for a {n}x{m} weight, the model's is "
                   f"{shape[0]}x{shape[1]}")
    if not (1 <= br <= n and 1 <= bc <= m):
        raise fail(f"block {br}x{bc} does not fit the {n}x{m} weight")
    fmt, P = _FORMATS[code], -(-n // br)
    rows, gather, bro, bco = a["row_perm"], a["col_gather"], a["block_row"], a["block_col"]

    def permutation(arr: np.ndarray, size: int, what: str) -> None:
        if arr.size != size or (size and (arr.min() < 0 or arr.max() >= size)) or \
                not np.all(np.bincount(arr, minlength=size) == 1):
            raise fail(f"{what} is not a permutation of range({size})")

    permutation(rows, n, "'row_perm'")
    nb = bro.size
    if bco.size != nb:
        raise fail(f"'block_row' has {nb} entries, 'block_col' {bco.size}")
    values = state["values"]
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or \
            tuple(values.shape) != (nb, br, bc):
        what = f"{values.dtype} of shape {tuple(values.shape)}" \
            if isinstance(values, torch.Tensor) else type(values).__name__
        raise fail(f"'values' must be floating point of shape {(nb, br, bc)} (the kept "
                   f"blocks), got {what}")
    if nb and (bro.min() < 0 or bro.max() >= P):
        raise fail(f"'block_row' holds block rows outside range({P})")
    if fmt == "grid":
        Q = -(-m // bc)
        if gather.size != Q * bc:
            raise fail(f"'col_gather' has {gather.size} entries, a grid of {Q} block columns "
                       f"of {bc} needs {Q * bc}")
        permutation(gather[:m], m, "'col_gather'[:cols]")
        if np.any(gather[m:] != m):
            raise fail(f"'col_gather' pads with other than the zero column {m}")
        if nb and (bco.min() < 0 or bco.max() >= Q):
            raise fail(f"'block_col' holds block columns outside range({Q})")
        if np.any(np.diff(bro * Q + bco) <= 0):
            raise fail("the kept blocks are repeated or not in row-major order")
        kept = np.zeros((P, Q), bool)
        kept[bro, bco] = True
        R = np.repeat(np.repeat(kept, br, axis=0), bc, axis=1)[:n, :m]
        mask = np.zeros((n, m), bool)
        mask[np.ix_(rows, gather[:m])] = R
        col_perm, panel_cols = gather[:m], None
    else:
        if not np.array_equal(bco, np.arange(nb)):
            raise fail("'block_col' of a shuffled layout must be 0, 1, ... (tile t is block "
                       "column t)")
        if np.any(np.diff(bro) < 0):
            raise fail("the tiles are not in panel order")
        if gather.size != nb * bc or (gather.size and (gather.min() < 0 or gather.max() > m)):
            raise fail(f"'col_gather' must hold {nb} tiles of {bc} columns in range({m + 1}) "
                       f"(got {gather.size} entries)")
        g = gather.reshape(nb, bc)
        real = g < m
        counts = real.sum(axis=1)
        last = np.r_[bro[1:] != bro[:-1], True] if nb else np.zeros(0, bool)
        if np.any(real[:, 1:] & ~real[:, :-1]) or np.any(counts == 0) or \
                np.any(counts[~last] != bc):
            raise fail("a tile is empty, padded before its columns, or short without being "
                       "its panel's last")
        cols, panel = g[real], np.repeat(bro, counts)
        sizes = np.bincount(panel, minlength=P)
        panel_cols = tuple(np.split(cols, np.cumsum(sizes)[:-1]))
        cover = np.zeros((P, m), bool)
        cover[panel, cols] = True
        mask = np.zeros((n, m), bool)
        mask[rows] = np.repeat(cover, br, axis=0)[:n]
        col_perm = None
    try:
        check_layout(mask, fmt, (br, bc), rows, col_perm, panel_cols)
    except RegroupError as exc:
        raise fail(str(exc)) from None
    return LayerResult(name=name, shape=(n, m), mask=mask, row_perm=rows, col_perm=col_perm,
                       panel_cols=panel_cols, block_shape=(br, bc), format=fmt,
                       method="stored")


def set_backend(model: nn.Module, backend: str) -> int:
    """Set the execution path of every block-sparse module in ``model`` (see the module
    docstring; ``"bsr"`` or ``"dense"`` before tracing or exporting, ``"auto"`` to measure
    again); returns how many were set. Earlier auto measurements are forgotten."""
    if backend not in BACKENDS:
        raise ValueError(f"The 'backend' parameter of set_backend must be one of {BACKENDS}. "
                         f"Got {backend!r} instead.")
    cores = [m for m in model.modules() if isinstance(m, BlockCore)]
    for core in cores:
        core.backend = backend
        core.dispatch_log.clear()
        core.dispatch_records.clear()
    return len(cores)


class _BlockModule(nn.Module):
    """What the block-sparse modules share: their block core and its dispatch."""

    core: BlockCore

    @property
    def values(self) -> nn.Parameter:
        """The kept blocks, (n_blocks, br, bc), regrouped coordinates (trainable)."""
        return self.core.values

    @property
    def dispatch_log(self) -> dict:
        """``{(device, dtype, batch class, other dims, grad mode): path}`` chosen by
        backend auto."""
        return self.core.dispatch_log

    @property
    def dispatch_records(self) -> dict[tuple, DispatchRecord]:
        """What backend auto measured, per key of :attr:`dispatch_log`."""
        return self.core.dispatch_records


class BlockSparseLinear(_BlockModule):
    """A Linear layer whose weight is the kept blocks of a regrouped layout.

    Parameters
    ----------
    result : LayerResult
        The layout, in the coordinates of ``weight`` (see
        :meth:`regroup.adapters.torch.Plan.current_result` after folding).
    weight : Tensor of shape (out_features, in_features)
        Values; only those inside kept blocks are stored.
    bias : Tensor of shape (out_features,), optional
    backend : {"auto", "bsr", "triton", "dense"}, default="auto"
        See the module docstring.
    """

    def __init__(self, result: LayerResult, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        if weight.dim() != 2:
            raise RegroupError(f"layer {result.name!r}: BlockSparseLinear needs a 2-D "
                               f"weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.core = BlockCore(result, weight, backend)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, result: LayerResult, *,
                    backend: str = "auto") -> "BlockSparseLinear":
        """Build from an ``nn.Linear`` (its current weight, masked or not)."""
        return cls(result, linear.weight, linear.bias, backend=backend)

    def dense_weight(self) -> torch.Tensor:
        return self.core.dense_weight()

    def _run(self, x2d: torch.Tensor, path: str) -> torch.Tensor:
        if path == "dense":
            return F.linear(x2d, self.core.dense_weight(), self.bias)
        y = self.core.sparse_matmul(x2d, path)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self.core.dispatch(x2d, lambda p: self._run(x2d, p))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BlockSparseConv2d(_BlockModule):
    """A Conv2d whose (out, in*kh*kw) weight is the kept blocks of a regrouped layout.

    Sparse paths run the im2col product (``F.unfold``, then the block matmul); the dense
    path is ``F.conv2d`` with the masked weight. ``groups`` must be 1 and
    ``padding_mode`` "zeros".
    """

    def __init__(self, result: LayerResult, conv: nn.Conv2d, *, backend: str = "auto") -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise RegroupError(
                f"layer {result.name!r}: BlockSparseConv2d needs groups=1, numeric padding "
                f"and padding_mode='zeros' (got groups={conv.groups}, padding="
                f"{conv.padding!r}, padding_mode={conv.padding_mode!r}); keep it dense-masked")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.core = BlockCore(result, conv.weight.reshape(conv.out_channels, -1), backend)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def dense_weight(self) -> torch.Tensor:
        return self.core.dense_weight().reshape(self.out_channels, self.in_channels,
                                                *self.kernel_size)

    def _run(self, x: torch.Tensor, path: str) -> torch.Tensor:
        if path == "dense":
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding,
                            self.dilation)
        N, _, H, W = x.shape
        kh, kw = self.kernel_size
        Ho = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self.core.sparse_matmul(cols.transpose(1, 2).reshape(N * Ho * Wo, -1), path)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(N, Ho * Wo, -1).transpose(1, 2).reshape(N, -1, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.dispatch(x, lambda p: self._run(x, p))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")



def _additive(mask: torch.Tensor | None, dtype: torch.dtype, what: str) -> torch.Tensor | None:
    """A boolean mask (True = masked out) as the additive float mask torch's attention
    uses (-inf where masked); a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{what}: only bool and floating-point masks are supported, got "
                        f"{mask.dtype}")
    return mask


class BlockSparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with a block-sparse packed input projection and/or output
    projection; same call, same results.

    ``in_proj`` maps the model dimension E to q|k|v (the 3E x E ``in_proj_weight`` and
    ``in_proj_bias``), ``out_proj`` maps the heads back to E; each is a
    :class:`BlockSparseLinear` when its layout is given, else dense: ``out_proj`` is the
    original module (its mask, if pruned, kept), ``in_proj`` an ``nn.Linear`` with the
    same values (a prune / ao.pruning mask carried over as a torch.nn.utils.prune mask).
    Attention runs through :func:`~torch.nn.functional.scaled_dot_product_attention`;
    with ``need_weights=True`` the weights are computed explicitly (as torch does).
    Self-attention projects once; cross-attention runs the whole q|k|v product once per
    distinct input (``key is value`` counts once) and keeps its rows, because a regrouped
    row order mixes q, k and v rows in one panel.

    torch's fused paths read the packed weights as plain tensors (``in_proj_weight``,
    ``out_proj.weight``, and ``TransformerEncoderLayer``'s ``linear1.weight`` /
    ``linear2.weight``), which a block-sparse module does not have. They are taken only
    when ``self_attn._qkv_same_embed_dim`` is True (``nn.MultiheadAttention``'s own fast
    path, ``TransformerEncoderLayer.forward``'s check, ``TransformerEncoder.__init__``'s
    nested-tensor choice), so this module sets ``_qkv_same_embed_dim = False``: there is
    no packed ``in_proj_weight`` parameter, which is what the flag says to those readers.
    ``TransformerEncoderLayer`` then takes its Python path, which calls
    ``self_attn(x, x, x, ...)`` as a module. ``batch_first``, ``embed_dim``,
    ``num_heads``, ``in_proj_bias`` (read before that check), ``bias_k``, ``bias_v``,
    ``add_zero_attn`` and ``dropout`` are exposed as on ``nn.MultiheadAttention``.

    Parameters
    ----------
    mha : nn.MultiheadAttention
        Packed q/k/v (kdim = vdim = embed_dim), no ``add_bias_kv``, no ``add_zero_attn``
        (see :meth:`unsupported`).
    in_proj : LayerResult, optional
        The layout of ``mha.in_proj_weight`` in its current coordinates; None: dense.
    out_proj : LayerResult, optional
        The layout of ``mha.out_proj.weight``; None: ``mha.out_proj`` is kept.
    backend : {"auto", "bsr", "triton", "dense"}, default="auto"
        For the block-sparse projections (see the module docstring).
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj: LayerResult | None = None,
                 out_proj: LayerResult | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        why = self.unsupported(mha)
        if why is not None:
            raise RegroupError(f"BlockSparseMultiheadAttention: {why}")
        E = mha.embed_dim
        self.embed_dim, self.kdim, self.vdim = E, E, E
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        # False: no packed in_proj_weight parameter, so torch's fused paths fall back
        # (see the class docstring).
        self._qkv_same_embed_dim = False
        w, mask, source = read_mask(mha, "in_proj_weight")
        bias = mha.in_proj_bias
        if in_proj is not None:
            self.in_proj: nn.Module = BlockSparseLinear(in_proj, w, bias, backend=backend)
        else:
            dense = nn.Linear(E, 3 * E, bias=bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(unmasked(mha, "in_proj_weight"))
                if bias is not None:
                    dense.bias.copy_(bias)
            if source != "zeros":
                write_mask(dense, "weight", mask)
            self.in_proj = dense
        self.out_proj: nn.Module = mha.out_proj if out_proj is None else BlockSparseLinear(
            out_proj, mha.out_proj.weight.detach(), mha.out_proj.bias, backend=backend)

    @staticmethod
    def unsupported(mha: nn.Module) -> str | None:
        """Why ``mha`` cannot become a BlockSparseMultiheadAttention, or None."""
        if not isinstance(mha, nn.MultiheadAttention):
            return f"{type(mha).__name__} is not an nn.MultiheadAttention"
        if not mha._qkv_same_embed_dim:
            return (f"MultiheadAttention with kdim={mha.kdim}, vdim={mha.vdim} != embed_dim="
                    f"{mha.embed_dim} (separate q/k/v weights, no packed in_proj_weight)")
        if mha.bias_k is not None or mha.bias_v is not None:
            return "MultiheadAttention with add_bias_kv=True is not supported"
        if mha.add_zero_attn:
            return "MultiheadAttention with add_zero_attn=True is not supported"
        return None

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The q|k|v bias, (3E,), as ``nn.MultiheadAttention.in_proj_bias``."""
        return self.in_proj.bias

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 same_qkv: bool, same_kv: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        E = self.embed_dim
        if same_qkv:
            q, k, v = self.in_proj(query).split(E, dim=-1)
            return q, k, v
        q = self.in_proj(query)[..., :E]
        if same_kv:
            kv = self.in_proj(key)
            return q, kv[..., E:2 * E], kv[..., 2 * E:]
        return q, self.in_proj(key)[..., E:2 * E], self.in_proj(value)[..., 2 * E:]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`: ``(output, weights or None)``."""
        same_qkv, same_kv = query is key and key is value, key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        # (Checked in eager calls: torch.jit.trace warns on every test of a traced size.)
        if not torch.jit.is_tracing() and (
                E != self.embed_dim or key.shape[-1] != E or value.shape[-1] != E or
                key.shape[:2] != value.shape[:2] or key.shape[0] != N):
            raise ValueError(f"query, key, value of shapes {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)} (batch first) do not "
                             f"fit embed_dim={self.embed_dim}")
        kpm = _additive(key_padding_mask, query.dtype, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention)")
        mask = None
        if not (is_causal and kpm is None and not need_weights):
            # As torch: the hint is dropped once the padding mask is merged in (no longer
            # causal) or when weights are computed explicitly from attn_mask.
            mask = _additive(attn_mask, query.dtype, "attn_mask")
            is_causal = is_causal and kpm is None
            if mask is not None:
                want = (L, S) if mask.dim() == 2 else (N * H, L, S)
                if tuple(mask.shape) != want:
                    raise RuntimeError(f"attn_mask has shape {tuple(mask.shape)}, expected "
                                       f"{want}")
                mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(N, H, L, S)
        if kpm is not None:
            if tuple(kpm.shape) != (N, S):
                raise RuntimeError(f"key_padding_mask has shape {tuple(kpm.shape)}, expected "
                                   f"{(N, S)}")
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        q, k, v = (t.unflatten(-1, (H, self.head_dim)).transpose(1, 2)
                   for t in self._project(query, key, value, same_qkv, same_kv))
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / self.head_dim) ** 0.5, k.transpose(-2, -1))
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            o = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal)
        out = self.out_proj(o.transpose(1, 2).reshape(N, L, E))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")
