"""BlockSparseLinear / BlockSparseConv2d against dense: values, gradients, dispatch."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import regroup  # noqa: E402
from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (BlockSparseConv2d, BlockSparseLinear,  # noqa: E402
                                    BlockSparseMultiheadAttention)


def _layout(w: np.ndarray, block, fmt, seed=0, method="metis"):
    return regroup.regroup_pattern(regroup.from_array(w, name="w"), block=block, format=fmt,
                                   method=method, seed=seed)


def _masked(n, m, density, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, m)) * (rng.random((n, m)) < density)
    return w, torch.tensor(w, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(16, 70), m=st.integers(16, 70), b=st.sampled_from([4, 8, 16]),
       fmt=st.sampled_from(["grid", "shuffled"]), density=st.floats(0.05, 0.6),
       batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_block_sparse_linear_equals_dense_masked(n, m, b, fmt, density, batch, seed):
    w, _ = _masked(n, m, density, seed)
    if not w.any():
        return
    r = _layout(w, b, fmt, seed, method="sort")
    W = torch.tensor(w * r.mask)
    bias = torch.randn(n, dtype=torch.float64)
    x = torch.randn(batch, 3, m, dtype=torch.float64)
    expected = F.linear(x, W, bias)
    for backend in ("bsr", "dense"):
        mod = BlockSparseLinear(r, torch.tensor(w), bias, backend=backend)
        torch.testing.assert_close(mod(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mod.dense_weight(), W, rtol=0, atol=0)
    # Only the kept blocks are stored.
    assert mod.values.shape[0] == r.metrics["kept_blocks"]


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("shape", [(48, 40), (50, 37)])
def test_gradients_match_dense(fmt, shape):
    w, _ = _masked(*shape, 0.25, 1)
    r = _layout(w, 8, fmt)
    mod = BlockSparseLinear(r, torch.tensor(w), torch.randn(shape[0], dtype=torch.float64),
                            backend="bsr")
    x = torch.randn(4, shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: _call_with_values(mod, x, v),
                                    (x, mod.values.detach().clone().requires_grad_()),
                                    fast_mode=True)
    # And the same gradients as the dense path, for input, values and bias.
    grads = {}
    for backend in ("bsr", "dense"):
        mod.core.backend = backend
        xx = x.detach().clone().requires_grad_()
        mod.zero_grad()
        (mod(xx) ** 2).sum().backward()
        grads[backend] = (xx.grad, mod.values.grad.clone(), mod.bias.grad.clone())
    for a, b in zip(grads["bsr"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _call_with_values(mod, x, v):
    """The module's BSR product as a function of the input and the block values."""
    from regroup.adapters.torch.sparse import _BsrMatmul
    core = mod.core
    xt = x.t()
    if core.in_index is not None:
        xt = F.pad(xt, (0, 0, 0, 1)).index_select(0, core.in_index)
    yt = _BsrMatmul.apply(xt.contiguous(), v, core)[: mod.out_features]
    return (yt if core.out_index is None else yt.index_select(0, core.out_index)).t()


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_training_follows_the_masked_dense_model(fmt):
    """SGD on the block values = SGD on the dense weight with its gradient masked."""
    torch.manual_seed(0)
    w, _ = _masked(32, 24, 0.3, 2)
    r = _layout(w, 8, fmt)
    mask = torch.from_numpy(r.mask)
    mod = BlockSparseLinear(r, torch.tensor(w), torch.zeros(32, dtype=torch.float64),
                            backend="bsr")
    ref = nn.Linear(24, 32).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w) * mask)
        ref.bias.zero_()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (mod, ref)]
    x, target = torch.randn(64, 24, dtype=torch.float64), torch.randn(64, 32,
                                                                      dtype=torch.float64)
    for _ in range(5):
        for m, opt in zip((mod, ref), opts):
            opt.zero_grad()
            F.mse_loss(m(x), target).backward()
            if m is ref:
                m.weight.grad *= mask
            opt.step()
    torch.testing.assert_close(mod.dense_weight(), ref.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.bias, ref.bias)


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_block_sparse_conv_equals_conv(fmt, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 24, 3, stride=stride, padding=padding, dilation=dilation).double()
    w = conv.weight.detach().numpy() * (np.random.default_rng(0).random((24, 6, 3, 3)) < 0.3)
    r = _layout(w, 8, fmt)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w * r.mask))
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64, requires_grad=True)
    for backend in ("bsr", "dense"):
        mod = BlockSparseConv2d(r, conv, backend=backend)
        y = mod(x)
        torch.testing.assert_close(y, conv(x), rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(y.sum(), x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(conv(x).sum(), x)[0])


def test_grouped_conv_is_refused_with_the_reason():
    conv = nn.Conv2d(8, 16, 3, groups=2)
    w = conv.weight.detach().numpy() * (np.random.default_rng(0).random((16, 4, 3, 3)) < 0.3)
    r = _layout(w, 8, "grid")
    with pytest.raises(RegroupError, match="needs groups=1"):
        BlockSparseConv2d(r, conv)


def test_auto_dispatch_measures_once_per_input_class():
    w, _ = _masked(64, 64, 0.2, 3, torch.float32)
    r = _layout(w, 16, "grid")
    mod = BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32))
    with torch.no_grad():
        mod(torch.randn(5, 64))
        mod(torch.randn(7, 64))             # same class (batch rounded up to 8)
        mod(torch.randn(100, 64))
    assert set(mod.dispatch_log) == {("cpu", torch.float32, 8, (64,), False),
                                     ("cpu", torch.float32, 128, (64,), False)}
    assert set(mod.dispatch_log.values()) <= {"bsr", "dense"}
    # bf16 on CPU has no BSR kernel: auto runs dense, an explicit "bsr" says why not.
    with torch.no_grad():
        mod.to(torch.bfloat16)(torch.randn(4, 64, dtype=torch.bfloat16))
    assert mod.dispatch_log[("cpu", torch.bfloat16, 4, (64,), False)] == "dense"
    mod.core.backend = "bsr"
    with pytest.raises(RegroupError, match="cannot run torch.bfloat16 on cpu"):
        mod(torch.randn(4, 64, dtype=torch.bfloat16))


def test_layout_must_match_the_weight():
    w, _ = _masked(32, 32, 0.2, 4)
    r = _layout(w, 8, "grid")
    with pytest.raises(RegroupError, match="differs from the weight"):
        BlockSparseLinear(r, torch.zeros(32, 16))
    with pytest.raises(ValueError, match="'backend' parameter"):
        BlockSparseLinear(r, torch.tensor(w), backend="fast")


_TRITON_CHECK = r"""
import numpy as np, torch, regroup
from regroup.adapters.torch import BlockSparseConv2d, BlockSparseLinear
rng = np.random.default_rng(0)
for n, m, b, batch in ((64, 48, 16, 37), (70, 50, 16, 5), (64, 96, 32, 70)):
    w = rng.standard_normal((n, m)) * (rng.random((n, m)) < 0.3)
    r = regroup.regroup_pattern(regroup.from_array(w), block=b, format="shuffled",
                                method="metis")
    mod = BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32), torch.randn(n),
                            backend="triton")
    assert "triton" in mod.core.paths(torch.zeros(1, m))
    x = torch.randn(batch, m, requires_grad=True)
    y = mod(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, mod.values), g)
    mod.core.backend = "dense"
    y_ref = mod(x)
    ref = torch.autograd.grad(y_ref, (x, mod.values), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
conv = torch.nn.Conv2d(8, 32, 3, padding=1)
w = conv.weight.detach().numpy() * (rng.random((32, 8, 3, 3)) < 0.3)
r = regroup.regroup_pattern(regroup.from_array(w), block=16, format="shuffled",
                            method="metis")
with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(w * r.mask))
x = torch.randn(2, 8, 7, 7)
torch.testing.assert_close(BlockSparseConv2d(r, conv, backend="triton")(x), conv(x),
                           rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_shuffled_kernel_matches_dense_under_the_interpreter():
    """The CUDA kernel of the shuffled format, run by Triton's CPU interpreter (the
    interpreter is chosen when the kernel is built, hence a fresh process)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_triton_backend_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, _ = _masked(32, 32, 0.3, 5, torch.float32)
    r = _layout(w, 16, "shuffled")
    mod = BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32), backend="triton")
    with pytest.raises(RegroupError, match="backend 'triton' cannot run"):
        mod(torch.randn(3, 32))


# -- BlockSparseMultiheadAttention ------------------------------------------------------
E, H = 32, 4


def _mha_pair(fmt="grid", batch_first=True, bias=True, dropout=0.0, in_proj=True,
              out_proj=True, seed=0):
    """A pruned nn.MultiheadAttention (float64) with its weights set to the block masks,
    and its BlockSparseMultiheadAttention (dense projections where a layout is None)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first,
                                dtype=torch.float64)
    layouts = {}
    with torch.no_grad():
        if bias:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        for key, w, on in (("in_proj", mha.in_proj_weight, in_proj),
                           ("out_proj", mha.out_proj.weight, out_proj)):
            w.mul_(torch.rand_like(w) < 0.3)
            if on:
                layouts[key] = _layout(w.numpy(), 8, fmt, seed, method="sort")
                w.mul_(torch.from_numpy(layouts[key].mask))
    return mha.eval(), BlockSparseMultiheadAttention(mha, **layouts, backend="bsr").eval()


def _mha_calls(batch_first, N=3, L=5, S=7):
    """(query, key, value, kwargs) covering self / cross attention, masks, causality."""
    g = torch.Generator().manual_seed(1)

    def seq(T, n=N):
        shape = (n, T, E) if batch_first else (T, n, E)
        return torch.randn(shape, generator=g, dtype=torch.float64)

    x, q, k, v = seq(L), seq(L), seq(S), seq(S)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -3:] = True
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    per_head = torch.randn(N * H, L, S, generator=g, dtype=torch.float64)
    blocked = per_head > 1.0
    blocked[..., 0] = False                   # never a fully masked row (NaN)
    return [
        (x, x, x, {}),
        (x, x, x, {"attn_mask": causal, "is_causal": True}),
        (x, x, x, {"attn_mask": causal.double() * -1e4}),
        (q, k, k, {"key_padding_mask": kpm}),
        (q, k, v, {"key_padding_mask": kpm, "attn_mask": blocked}),
        (q, k, v, {"key_padding_mask": kpm.double() * -1e4, "attn_mask": per_head}),
        # Unbatched (batch_first does not apply).
        (x[0] if batch_first else x[:, 0], k[0] if batch_first else k[:, 0],
         k[0] if batch_first else k[:, 0], {"key_padding_mask": kpm[1]}),
    ]


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_block_sparse_mha_computes_the_masked_mha(fmt, batch_first):
    mha, sparse = _mha_pair(fmt, batch_first)
    assert isinstance(sparse.in_proj, BlockSparseLinear)
    assert isinstance(sparse.out_proj, BlockSparseLinear)
    for i, (q, k, v, kw) in enumerate(_mha_calls(batch_first)):
        for need_weights in (False, True):
            for average in (True, False):
                args = dict(kw, need_weights=need_weights, average_attn_weights=average)
                want, want_w = mha(q, k, v, **args)
                got, got_w = sparse(q, k, v, **args)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"call {i}")
                if need_weights:
                    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-10)
                else:
                    assert got_w is None and want_w is None


def test_block_sparse_mha_dense_projections_bias_free_dropout_and_gradients():
    # Only out_proj planned: in_proj stays a dense nn.Linear, no bias anywhere.
    mha, sparse = _mha_pair(in_proj=False, bias=False)
    assert type(sparse.in_proj) is nn.Linear and sparse.in_proj_bias is None
    x = torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True)
    want = mha(x, x, x)[0]
    got = sparse(x, x, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gx_want, = torch.autograd.grad(want.sum(), x)
    gx, gv = torch.autograd.grad(got.sum(), (x, sparse.out_proj.values))
    torch.testing.assert_close(gx, gx_want, rtol=1e-10, atol=1e-10)
    assert gv.abs().sum() > 0
    # Dropout in training: the same random draws as torch's (same shapes, same order).
    mha, sparse = _mha_pair(out_proj=False, dropout=0.3)
    mha.train()
    sparse.train()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    for need_weights in (True, False):
        torch.manual_seed(7)
        want = mha(x, x, x, need_weights=need_weights)[0]
        torch.manual_seed(7)
        got = sparse(x, x, x, need_weights=need_weights)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    sparse.eval()
    torch.testing.assert_close(sparse(x, x, x)[0], sparse(x, x, x)[0], rtol=0, atol=0)


def test_block_sparse_mha_refuses_what_it_cannot_run():
    for kwargs, match in (({"kdim": 16, "vdim": 16}, "kdim=16, vdim=16 != embed_dim=32"),
                          ({"add_bias_kv": True}, "add_bias_kv"),
                          ({"add_zero_attn": True}, "add_zero_attn")):
        mha = nn.MultiheadAttention(E, H, **kwargs)
        assert match in BlockSparseMultiheadAttention.unsupported(mha)
        with pytest.raises(RegroupError, match=match):
            BlockSparseMultiheadAttention(mha)
    assert "not an nn.MultiheadAttention" in BlockSparseMultiheadAttention.unsupported(
        nn.Linear(4, 4))
    _, sparse = _mha_pair()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        sparse(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask has shape"):
        sparse(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="only bool and floating-point"):
        sparse(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit embed_dim=32"):
        sparse(x[..., :16], x[..., :16], x[..., :16])
