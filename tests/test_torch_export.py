"""torch.export and torch.jit.trace of block-sparse models: the traced program computes the
eager output (fp32, <= 1e-5 relative), the BSR product as the op regroup::bsr_mm, and
backend "auto" says which path it traced when it had nothing measured."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

import regroup  # noqa: E402
from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (BlockSparseLinear, DispatchRecord,  # noqa: E402
                                    regroup_model, set_backend, to_block_sparse)
from regroup.adapters.torch import sparse  # noqa: E402

from tests.torch_zoo import prune_encoder, pruned  # noqa: E402

RTOL = 1e-5
BSR_OP = "torch.ops.regroup.bsr_mm.default"


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} x {scale:.3g}"


def _converted(name: str, backend: str, fmt: str = "grid"):
    model, x = pruned(name)
    plan = regroup_model(model, block=8, format=fmt, mode="fold", example_inputs=(x,),
                         method="sort")
    to_block_sparse(model, plan, backend=backend)
    return model, x


def _export(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        return ep, ep.module()(x)


def _trace(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        tr = torch.jit.trace(model, (x,), check_trace=False)
        return tr, tr(x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("backend", ["bsr", "dense"])
@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_export_and_trace_reproduce_the_eager_model(name, backend, fmt):
    model, x = _converted(name, backend, fmt)
    with torch.no_grad():
        want = model(x)
    ep, got = _export(model, x)
    _close(got, want, f"torch.export ({backend})")
    assert (BSR_OP in ep.graph_module.code) == (backend == "bsr")
    # The block values stay the program's parameters (no dense weight baked in).
    assert any(k.endswith("core.values") for k in ep.state_dict)
    tr, got = _trace(model, x)
    _close(got, want, f"torch.jit.trace ({backend})")
    assert ("regroup::bsr_mm" in str(tr.inlined_graph)) == (backend == "bsr")
    # The traced program follows the values: it rebuilt nothing at trace time.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
        half = model(x)
    _close(tr(x), half, "traced after the values changed")


def test_auto_traces_the_path_it_measured():
    model, x = _converted("mlp", "auto")
    with torch.no_grad():
        want = model(x)                          # measures every layer on this input class
    chosen = {m.core.name: m.core.dispatch_log for m in model.modules()
              if isinstance(m, BlockSparseLinear)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # nothing to say: every path was measured
        ep, got = _export(model, x)
    _close(got, want, "auto, measured")
    n_bsr = sum(p == "bsr" for log in chosen.values() for p in log.values())
    assert ep.graph_module.code.count(BSR_OP) == n_bsr


def test_auto_without_a_measurement_traces_dense_and_says_so():
    model, x = _converted("mlp", "auto")
    with torch.no_grad():
        want = model(x[:1])                      # another batch class: nothing for x
    with pytest.warns(RuntimeWarning, match="backend 'auto' has no measured path for input "
                                            r"\(<=8, 40\) float32 on cpu.*uses the dense path"):
        ep, got = _export(model, x)
    assert BSR_OP not in ep.graph_module.code
    with torch.no_grad():
        _close(got, model(x), "auto, unmeasured")
    assert want.shape == (1, 10)
    # An explicit choice instead: set_backend, no warning.
    assert set_backend(model, "bsr") == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ep, _ = _export(model, x)
    assert ep.graph_module.code.count(BSR_OP) == 3


def test_a_measured_triton_path_is_traced_as_bsr_with_a_warning():
    model, x = _converted("mlp", "auto")
    key = ("cpu", torch.float32, 8, (40,), False)
    first = model.layers[0].core
    first.dispatch_records[key] = DispatchRecord("triton", {"dense": 1.0, "triton": 0.5}, 1,
                                                 0.0)
    with pytest.warns(RuntimeWarning, match="the Triton path measured by 'auto' cannot be "
                                            "traced; the traced program uses 'bsr'"):
        ep, _ = _export(model, x)
    assert BSR_OP in ep.graph_module.code


def test_an_explicit_triton_backend_is_refused_when_traced(monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)) * (rng.random((32, 32)) < 0.3)
    r = regroup.regroup_pattern(regroup.from_array(w), block=16, format="shuffled",
                                method="sort")
    mod = BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32), backend="triton")
    monkeypatch.setattr(sparse.triton_shuffled, "available", lambda device: True)
    with pytest.raises(RegroupError, match="backend 'triton' cannot be traced or exported"):
        torch.export.export(mod, (torch.randn(4, 32),))
    with pytest.raises(ValueError, match="'backend' parameter of set_backend must be one of"):
        set_backend(mod, "fast")


def test_the_bsr_op_has_the_gradients_of_the_eager_product():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 36)) * (rng.random((40, 36)) < 0.3)
    for fmt in ("grid", "shuffled"):
        r = regroup.regroup_pattern(regroup.from_array(w), block=8, format=fmt, method="sort")
        c = BlockSparseLinear(r, torch.tensor(w), backend="bsr").core
        xt = torch.randn(c.padded[1], 5, dtype=torch.float64, requires_grad=True)
        v = c.values.detach().clone().requires_grad_()

        def op(xt, v, c=c):
            return torch.ops.regroup.bsr_mm(xt, v, c.crow, c.col, c.crow_t, c.col_t,
                                            c.perm_t, c.block_row, c.block_col, c.padded[0])

        assert torch.autograd.gradcheck(op, (xt, v), fast_mode=True)
        y, y_eager = op(xt, v), sparse._BsrMatmul.apply(xt, v, c)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (xt, v), g),
                        torch.autograd.grad(y_eager, (xt, v), g)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- real networks -------------------------------------------------------------------------
def test_mobilenet_exports_and_traces(real_mobilenet, zoo):
    model = real_mobilenet()
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)
    x = zoo.photo_crops(1, size=96)
    plan = regroup_model(model, mode="fold", block=16, method="sort", example_inputs=(x,))
    to_block_sparse(model, plan, backend="bsr")
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # prune's pre-hooks assign weights during export
        ep, got = _export(model, x)
    _close(got, want, "MobileNetV2 torch.export")
    assert ep.graph_module.code.count(BSR_OP) == len(plan.layers)
    _, got = _trace(model, x)
    _close(got, want, "MobileNetV2 torch.jit.trace")


def test_minilm_encoder_with_block_sparse_attention_exports(zoo):
    try:
        model = zoo.minilm_torch_encoder(2)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    prune_encoder(model)
    plan = regroup_model(model, mode="runtime", block=16, method="sort")
    to_block_sparse(model, plan, backend="bsr")
    x = torch.randn(2, 9, 384, generator=torch.Generator().manual_seed(0))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        want = model(x, src_key_padding_mask=kpm)
        ep = torch.export.export(model, (x,), {"src_key_padding_mask": kpm})
        got = ep.module()(x, src_key_padding_mask=kpm)
        assert ep.graph_module.code.count(BSR_OP) == 8          # 2 x (in, out, 1, 2)
        _close(got, want, "TransformerEncoder torch.export")
        tr = torch.jit.trace(model, (x,), check_trace=False)
        _close(tr(x), model(x), "TransformerEncoder torch.jit.trace")


_CHILD = r"""
import sys, torch
import regroup.adapters.torch          # registers torch.ops.regroup.bsr_mm
ep = torch.export.load(sys.argv[1])
x, want = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    got = ep.module()(x)
print(float((got - want).abs().max() / want.abs().max()))
"""


def test_an_exported_program_runs_in_a_fresh_process(tmp_path):
    model, x = _converted("cnn", "bsr")
    with torch.no_grad():
        want = model(x)
    ep, _ = _export(model, x)
    torch.export.save(ep, tmp_path / "cnn.pt2")
    torch.save((x, want), tmp_path / "io.pt")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "cnn.pt2"),
                           str(tmp_path / "io.pt")], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= RTOL
