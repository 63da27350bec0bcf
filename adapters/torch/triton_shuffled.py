"""A Triton kernel for the shuffled block format: gathered column tiles, no gather copy.

Each row panel ``p`` of ``br`` rows keeps its own tiles of ``bc`` columns (any columns).
The kernel computes ``Y[:, p*br:(p+1)*br] = sum_t X[:, cols_t] @ W_t.T`` over the panel's
tiles, loading the tile's columns of ``X`` straight from memory: the gathered copy of the
input that the BSR path needs is never written. One program per (panel, batch slice).

The backward pass (input and block-value gradients) runs as gathers and batched matmuls in
torch. CUDA only in practice (fp16 / bf16 / fp32, ``br`` and ``bc`` powers of two >= 16);
on CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how it
is tested without a GPU.
"""
from __future__ import annotations

import os

import torch

__all__ = ["available", "shuffled_matmul"]

_KERNEL = None


def _triton():
    try:
        import triton
    except ImportError:
        return None
    return triton


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton() is not None


def _kernel():
    """The jitted kernel, built on first use (importing triton is slow, and whether it
    is interpreted is fixed when the kernel is decorated)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = _triton()
    if triton is None:
        raise ImportError("the shuffled Triton kernel requires triton. You can install it "
                          "with `pip install triton`.")
    import triton.language as tl

    @triton.jit
    def shuffled_fwd(x_ptr, w_ptr, cols_ptr, ptr_ptr, y_ptr, N, M, stride_xn, stride_yn,
                     BR: tl.constexpr, BC: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
        p = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BR)
        offs_c = tl.arange(0, BC)
        start = tl.load(ptr_ptr + p)
        end = tl.load(ptr_ptr + p + 1)
        acc = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
        for t in range(start, end):
            cols = tl.load(cols_ptr + t * BC + offs_c)        # index M: padding, reads 0
            ok = (offs_n[:, None] < N) & (cols[None, :] < M)
            xt = tl.load(x_ptr + offs_n[:, None] * stride_xn + cols[None, :], mask=ok,
                         other=0.0)
            w = tl.load(w_ptr + t * BR * BC + offs_r[:, None] * BC + offs_c[None, :])
            acc += tl.dot(xt, tl.trans(w), input_precision=PRECISION)
        out = y_ptr + offs_n[:, None] * stride_yn + p * BR + offs_r[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=offs_n[:, None] < N)

    _KERNEL = (shuffled_fwd, triton.cdiv)
    return _KERNEL


class _ShuffledMatmul(torch.autograd.Function):
    """``Y = X @ W.T`` (padded panel rows) for the tiles of a shuffled block core."""

    @staticmethod
    def forward(ctx, x, values, core):
        N, m = x.shape
        br, bc = core.block
        P = core.padded[0] // br
        x = x.contiguous()
        y = x.new_empty((N, P * br))
        kernel, cdiv = _kernel()
        block_n = 16 if N <= 16 else 64
        grid = (P, cdiv(N, block_n))
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        kernel[grid](x, values.contiguous(), core.in_index, core.crow, y, N, m,
                            x.stride(0), y.stride(0), BR=br, BC=bc, BLOCK_N=block_n,
                            PRECISION=precision)
        ctx.save_for_backward(x, values)
        ctx.core = core
        return y

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        core = ctx.core
        N, m = x.shape
        br, bc = core.block
        gyb = gy.reshape(N, -1, br)[:, core.block_row]                  # (N, T, br)
        xz = torch.nn.functional.pad(x, (0, 1))
        gx = gv = None
        if ctx.needs_input_grad[1]:
            xg = xz.index_select(1, core.in_index).view(N, -1, bc)      # (N, T, bc)
            gv = torch.einsum("ntr,ntc->trc", gyb, xg)
        if ctx.needs_input_grad[0]:
            contrib = torch.einsum("ntr,trc->ntc", gyb, values).reshape(N, -1)
            gx = torch.zeros_like(xz).index_add(1, core.in_index, contrib)[:, :m]
        return gx, gv, None


def shuffled_matmul(x: torch.Tensor, core) -> torch.Tensor:
    """``x @ W.T`` in padded regrouped rows, for a shuffled-format block core."""
    return _ShuffledMatmul.apply(x, core.values, core)
