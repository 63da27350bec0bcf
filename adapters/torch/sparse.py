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
- ``"auto"`` (default): the first call for each (device, dtype, batch size class, grad
  mode) times every available path on that very input and keeps the fastest; a sparse
  path must beat dense by 5 % to be chosen, so auto is never measurably slower than
  dense. The choices are in ``module.dispatch_log``.

Gradients flow to the input and to the block values (``module.values``), so the modules
train; the gradient of a BSR product is computed with the transposed layout because
torch's BSR matmul has no backward for a sparse weight.

:class:`BlockSparseMultiheadAttention` replaces an ``nn.MultiheadAttention`` whose packed
``in_proj_weight`` (q|k|v rows) and/or ``out_proj`` are regrouped: the projections run as
:class:`BlockSparseLinear`, the attention itself through
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import math
import time
import warnings
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
           "BACKENDS", "MARGIN"]

BACKENDS = ("auto", "bsr", "triton", "dense")
# A sparse path is chosen by "auto" only when it beats dense by this factor.
MARGIN = 0.95
_REPS, _MAX_REPS, _TIME_PER_PATH = 3, 30, 0.05


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


class _BlockCore(nn.Module):
    """The kept blocks of one weight matrix (rows x cols) and the products they allow.

    Both formats become one BSR matrix over a gathered input: grid gathers the columns in
    ``col_perm`` order (b x b blocks on a P x Q grid); shuffled gathers every kept tile's
    columns side by side, so tile ``t`` is block column ``t`` of its panel's block row.
    ``in_index`` (None when the identity) is that gather; index ``cols`` reads an appended
    zero column (padding of short tiles and edges). ``out_index`` puts rows back.
    """

    def __init__(self, result: LayerResult, weight2d: torch.Tensor, backend: str) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"The 'backend' parameter must be one of {BACKENDS}. Got "
                             f"{backend!r} instead.")
        n, m = weight2d.shape
        mask = np.asarray(result.mask2d, bool)
        if mask.shape != (n, m):
            raise RegroupError(f"layer {result.name!r}: layout shape {mask.shape} differs from "
                               f"the weight's {(n, m)}")
        check_layout(mask, result.format, result.block_shape, result.row_perm,
                     result.col_perm, result.panel_cols)
        self.name, self.format, self.block = result.name, result.format, tuple(result.block_shape)
        self.backend = backend
        self.shape = (n, m)
        br, bc = self.block
        P = -(-n // br)
        row_perm = np.asarray(result.row_perm, np.int64)
        if self.format == "grid":
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
        self.padded = (P * br, Q * bc)
        identity = gather.size == m and np.array_equal(gather, np.arange(m)) and \
            self.format == "grid"
        self.register_buffer("in_index", None if identity else torch.from_numpy(gather),
                             persistent=False)
        self.register_buffer("out_index", _index(positions(row_perm)), persistent=False)
        w = weight2d.detach()
        Wz = torch.cat([w[torch.from_numpy(row_perm)], w.new_zeros((n, 1))], dim=1)
        Wp = w.new_zeros(self.padded)
        Wp[:n] = Wz[:, torch.from_numpy(gather)]
        values = Wp.reshape(P, br, Q, bc).permute(0, 2, 1, 3)[
            torch.from_numpy(block_row), torch.from_numpy(block_col)]
        counts_r = np.bincount(block_row, minlength=P)
        counts_c = np.bincount(block_col, minlength=Q)
        perm_t = np.lexsort((block_row, block_col))   # the transposed layout's block order
        for name, arr in (("crow", np.concatenate([[0], np.cumsum(counts_r)])),
                          ("col", block_col),
                          ("crow_t", np.concatenate([[0], np.cumsum(counts_c)])),
                          ("col_t", block_row[perm_t]), ("perm_t", perm_t),
                          ("block_row", block_row), ("block_col", block_col)):
            self.register_buffer(name, torch.from_numpy(np.asarray(arr, np.int64)),
                                 persistent=False)
        self.values = nn.Parameter(values.contiguous().clone())
        self.dispatch_log: dict[tuple, str] = {}
        self._dense_cache: tuple[Any, torch.Tensor] | None = None

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
        # Inference reuses the dense weight until the values change (in place or replaced).
        key = (self.values._version, self.values.data_ptr(), self.values.device)
        if not torch.is_grad_enabled() and self._dense_cache is not None and \
                self._dense_cache[0] == key:
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
        if not torch.is_grad_enabled():
            self._dense_cache = (key, W)
        return W

    def sparse_matmul(self, x: torch.Tensor, path: str = "bsr") -> torch.Tensor:
        """``x @ W.T`` for a 2-D ``x`` (batch, cols) through the BSR product or, for the
        shuffled format, the Triton tile kernel (``path="triton"``)."""
        n, m = self.shape
        if self.values.shape[0] == 0:      # no kept block: W is zero
            return x.new_zeros((x.shape[0], n)) + 0 * self.values.sum()
        if path == "triton":
            y = triton_shuffled.shuffled_matmul(x, self)[:, :n]
            return y if self.out_index is None else y.index_select(1, self.out_index)
        # Gathering rows of x.T copies contiguous runs: ~2x faster than columns of x.
        xt = x.t().contiguous()
        if self.in_index is not None:
            xt = F.pad(xt, (0, 0, 0, 1)).index_select(0, self.in_index)
        yt = _BsrMatmul.apply(xt, self.values, self)[:n]
        if self.out_index is not None:
            yt = yt.index_select(0, self.out_index)
        return yt.t()

    def choose(self, x: torch.Tensor, run) -> str:
        """The path for input ``x``: fixed by ``backend``, or measured once per class of
        inputs (``run(path)`` performs the whole forward on ``x``)."""
        paths = self.paths(x)
        if self.backend != "auto":
            if self.backend not in paths:
                raise RegroupError(
                    f"layer {self.name!r}: backend {self.backend!r} cannot run "
                    f"{x.dtype} on {x.device.type} with {self.block[0]}x{self.block[1]} "
                    f"blocks (available: {paths}); use backend='auto' or 'dense'")
            return self.backend
        # Batch sizes share a power-of-two class; the other dims (a conv's image size)
        # change the cost, so they are part of the key.
        key = (x.device.type, x.dtype, 1 << max(0, math.ceil(math.log2(max(1, x.shape[0])))),
               tuple(x.shape[1:]), torch.is_grad_enabled())
        choice = self.dispatch_log.get(key)
        if choice is None:
            times = _time(run, paths, x.device)
            best = min((p for p in paths if p != "dense"), key=times.get, default="dense")
            choice = best if times[best] < MARGIN * times["dense"] else "dense"
            self.dispatch_log[key] = choice
        return choice

    def extra_repr(self) -> str:
        return (f"format={self.format}, block={self.block[0]}x{self.block[1]}, "
                f"blocks={self.values.shape[0]}, backend={self.backend}")


def _time(run, paths: list[str], device: torch.device) -> dict[str, float]:
    """Best-of-n seconds per path, the paths interleaved so that a burst of load on the
    machine hits them alike; n grows for fast calls (3 to 30, ~50 ms per path), whose
    timings are the noisiest."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = dict.fromkeys(paths, float("inf"))
    with torch.no_grad():
        for p in paths:                             # warm-up (and lazy init), timed once
            run(p)
            sync()
            t0 = time.perf_counter()
            run(p)
            sync()
            best[p] = time.perf_counter() - t0
        reps = int(min(_MAX_REPS, max(_REPS, _TIME_PER_PATH / max(min(best.values()), 1e-7))))
        for _ in range(reps):
            for p in paths:
                t0 = time.perf_counter()
                run(p)
                sync()
                best[p] = min(best[p], time.perf_counter() - t0)
    return best


class _BlockModule(nn.Module):
    """What the block-sparse modules share: their block core and its dispatch."""

    core: _BlockCore

    @property
    def values(self) -> nn.Parameter:
        """The kept blocks, (n_blocks, br, bc), regrouped coordinates (trainable)."""
        return self.core.values

    @property
    def dispatch_log(self) -> dict:
        """``{(device, dtype, batch class, other dims, grad mode): path}`` chosen by
        backend auto."""
        return self.core.dispatch_log


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
        self.core = _BlockCore(result, weight, backend)
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
        path = self.core.choose(x2d, lambda p: self._run(x2d, p))
        return self._run(x2d, path).reshape(*x.shape[:-1], self.out_features)

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
        self.core = _BlockCore(result, conv.weight.reshape(conv.out_channels, -1), backend)
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
        path = self.core.choose(x, lambda p: self._run(x, p))
        return self._run(x, path)

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
        if E != self.embed_dim or key.shape[-1] != E or value.shape[-1] != E or \
                key.shape[:2] != value.shape[:2] or key.shape[0] != N:
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
