"""RegroupDST(execution="block"): the layers run as block-sparse modules from prepare() on.

Against the masked execution on the same model, seed and data (same dense weights after
every step, same dense gradients on the armed steps, same history, drop/grow and accepted
re-layouts included, with SGD + momentum and with Adam); the values Parameter kept
(object and shape) and remapped with its optimizer state; the state dict round trip;
convert(); validation.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from regroup import LayerResult, RegroupError  # noqa: E402
from regroup.adapters.torch import (BlockSparseConv2d, BlockSparseLinear,  # noqa: E402
                                    RegroupDST, set_backend)
from regroup.adapters.torch.sparse import LAYOUT_KEYS, BlockCore  # noqa: E402
from regroup.blocks import layout_mask  # noqa: E402
from regroup.dst import make_units, units_layout  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


def _convnet(seed=0):
    # 4.weight (4 x 32) is smaller than a block: element-wise, masked in both executions.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1, dilation=1), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(64, 64, generator=g), torch.randint(0, 32, (64,), generator=g)
    return torch.randn(16, 8, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _train(model, opt, sp, kind, steps):
    """``steps`` steps on the fixed batch of ``kind``, the sparsifier stepped after each."""
    x, y = _data(kind)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _opt(model, kind):
    return (torch.optim.Adam(model.parameters(), lr=1e-2) if kind == "adam" else
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))


def _dense(sp, model, fqn):
    """The weight layer ``fqn`` computes with, whatever the execution."""
    module = model.get_submodule(fqn.rpartition(".")[0])
    if isinstance(module, (BlockSparseLinear, BlockSparseConv2d)):
        return module.dense_weight().detach()
    return module.weight.detach()


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _same_history(a, b):
    """Records alike but for float rounding (the two executions sum the products in
    other orders): churn to 1e-6, the numbers of a note to its 4 digits."""
    assert len(a) == len(b)
    for ha, hb in zip(_strip(a), _strip(b)):
        assert ha.pop("churn") == pytest.approx(hb.pop("churn"), rel=1e-6, abs=1e-12)
        na, nb = ha.pop("relayout_note"), hb.pop("relayout_note")
        assert (na or "").split(" ")[0] == (nb or "").split(" ")[0]
        assert ha == hb


def _pair(net, opt_kind, fmt, steps, backend="bsr", device="cpu", **kw):
    """The same model trained masked and block; yields after every step."""
    make = _mlp if net == "mlp" else _convnet
    models, opts, sps = [], [], []
    for execution in ("masked", "block"):
        model = make().to(device)
        opt = _opt(model, opt_kind)
        sp = RegroupDST(0.75, block=8, format=fmt, T=2, T_end=40, relayout_every=1,
                        optimizer=opt, execution=execution, **kw)
        sp.prepare(model)
        models.append(model)
        opts.append(opt)
        sps.append(sp)
    set_backend(models[1], backend)
    x, y = (t.to(device) for t in _data(net))
    for step in range(steps):
        for model, opt in zip(models, opts):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        grads = [dict(sp._grads) for sp in sps]
        for sp in sps:
            sp.step()
        yield step, models, opts, sps, grads


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("net,opt_kind,fmt,backend,device", [
    ("mlp", "sgd", "grid", "bsr", "cpu"), ("mlp", "adam", "shuffled", "bsr", "cpu"),
    ("conv", "sgd", "shuffled", "bsr", "cpu"), ("conv", "adam", "grid", "dense", "cpu"),
    # (an MLP: cuDNN convolutions may run in TF32, the masked and block sums then differ)
    pytest.param("mlp", "adam", "shuffled", "dense", "cuda", marks=_CUDA)])
def test_block_execution_trains_as_the_masked_one(net, opt_kind, fmt, backend, device):
    armed = 0
    for step, (mm, mb), _, (sm, sb), (gm, gb) in _pair(net, opt_kind, fmt, 12, backend,
                                                       device):
        if step == 0:
            blocked = {"mlp": ["0.weight", "2.weight"],
                       "conv": ["0.weight", "2.weight", "4.weight"]}[net]
            assert sorted(sb._block) == blocked and sm._block == {}
            assert set(sb.masked) == ({"6.weight"} if net == "conv" else set())
            assert all(isinstance(mb.get_submodule(n[:-7]), (BlockSparseLinear,
                                                              BlockSparseConv2d))
                       for n in blocked)
        # The dense gradient of the armed step: dL/dW from the input and output gradient.
        assert set(gm) == set(gb)
        for n in gm:
            armed += 1
            torch.testing.assert_close(gb[n], gm[n], rtol=1e-4, atol=1e-6)
        for n in sm.results:
            assert np.array_equal(sm.results[n].mask, sb.results[n].mask)
            torch.testing.assert_close(_dense(sb, mb, n), _dense(sm, mm, n), rtol=0,
                                       atol=1e-5)
        for pm, pb in zip([p for k, p in mm.named_parameters() if k.endswith("bias")],
                          [p for k, p in mb.named_parameters() if k.endswith("bias")]):
            torch.testing.assert_close(pb, pm, rtol=0, atol=1e-5)
        _same_history(sb.history, sm.history)
    assert armed >= 2 * len(sm.results)
    hist = sb.history
    assert sum(h["dropped"] for h in hist) > 0 and sum(h["grown"] for h in hist) > 0
    assert any(h["relayout"] for h in hist)              # an accepted re-layout


def test_the_dense_gradient_adds_up_over_every_backward_of_the_armed_step():
    model = _convnet()
    sp = RegroupDST(0.75, block=8, T=2, T_end=20, optimizer=_opt(model, "sgd"),
                    execution="block")
    sp.prepare(model)
    set_backend(model, "bsr")
    x, y = _data("conv")
    nn.functional.cross_entropy(model(x), y).backward()          # step 1: not armed
    assert sp._grads == {}
    sp.step()
    halves = [(x[:8], y[:8]), (x[8:], 2 * y[8:] % 4)]
    for xb, yb in halves:                                           # step 2: armed
        nn.functional.cross_entropy(model(xb), yb).backward()
    # The reference: the same network from the dense weights, dL/dW by autograd.
    ws = [model[i].dense_weight().detach().requires_grad_() for i in (0, 2, 4)]
    for xb, yb in halves:
        h = nn.functional.conv2d(xb, ws[0], model[0].bias, 1, 1).relu()
        h = nn.functional.conv2d(h, ws[1], model[2].bias, 2, 1).flatten(1)
        h = nn.functional.linear(h, ws[2], model[4].bias).relu()
        nn.functional.cross_entropy(model[6](h), yb).backward()
    for n, w in zip(("0.weight", "2.weight", "4.weight"), ws):
        torch.testing.assert_close(sp._grads[n], w.grad, rtol=1e-4, atol=1e-6)
    sp.step()
    assert sp._grads == {} and [h["skipped"] for h in sp.history] == [None] * 4


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_values_stay_one_parameter_and_carry_their_optimizer_state(opt_kind):
    model = _mlp()
    weight, bias = model[0].weight, model[0].bias
    opt = _opt(model, opt_kind)
    sp = RegroupDST(0.75, block=8, format="shuffled", T=3, T_end=40, relayout_every=2,
                    optimizer=opt, execution="block")
    sp.prepare(model)
    core = model[0].core
    values = core.values
    shape = tuple(values.shape)
    # The optimizer holds the values where it held the weight; the bias is the same.
    params = opt.param_groups[0]["params"]
    assert any(p is values for p in params) and all(p is not weight for p in params)
    assert model[0].bias is bias and any(p is bias for p in params)
    x, y = _data("mlp")
    names = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"}}[opt_kind]
    checked = relaid = 0
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v for k, v in opt.state[values].items() if v.shape == values.shape}
        assert set(state) == names
        old = sp.results["0.weight"].mask.copy()
        before = {k: core.to_dense(v).clone() for k, v in state.items()}
        w_before = core.to_dense(values.detach()).clone()
        n = len(sp.history)
        sp.step()
        assert model[0].core.values is values and tuple(values.shape) == shape
        assert opt.param_groups[0]["params"] == params
        if len(sp.history) == n:
            continue
        rec = next(h for h in sp.history[n:] if h["layer"] == "0.weight")
        relaid += bool(rec["relayout"])
        new = sp.results["0.weight"].mask
        both, fresh = torch.from_numpy(old & new), torch.from_numpy(new & ~old)
        if rec["grown"] or rec["relayout"]:
            checked += 1
            assert fresh.any()
        w_after = core.to_dense(values.detach())
        assert torch.equal(w_after[both], w_before[both]) and not w_after[~both].any()
        for k, v in opt.state[values].items():
            if k not in names:
                continue
            after = core.to_dense(v)
            assert v.shape == values.shape
            assert torch.equal(after[both], before[k][both])      # carried, slot moved
            assert not after[fresh].any() and not after[~both].any()
            assert before[k][~both].abs().sum() > 0               # there was state to clear
    assert checked >= 2 and relaid >= 1


def test_state_dict_round_trip_in_block_mode():
    *_, (_, (_, model), (_, opt), (_, sp), _) = _pair("mlp", "sgd", "shuffled", 9)
    assert any(h["relayout"] for h in sp.history)
    buf = io.BytesIO()
    torch.save({"sp": sp.state_dict(), "model": model.state_dict(),
                "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    def fresh(seed=5, execution="block"):
        m = _mlp(seed)
        o = _opt(m, "sgd")
        s = RegroupDST(0.75, block=8, format="shuffled", T=2, T_end=40, relayout_every=1,
                       optimizer=o, execution=execution)
        s.prepare(m)
        set_backend(m, "bsr")                   # as the saved run: the same sums
        return m, o, s

    # The model's block layout is not the saved one until the sparsifier's state is in.
    model2, opt2, sp2 = fresh()
    with pytest.raises(RegroupError, match="block layout.*load the sparsifier's state "
                       "dict first"):
        model2.load_state_dict(saved["model"])
    model2, opt2, sp2 = fresh()
    values = [model2[i].core.values for i in (0, 2)]
    sp2.load_state_dict(saved["sp"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(copy.deepcopy(saved["opt"]))
    assert [model2[i].core.values for i in (0, 2)] == values      # the same Parameters
    for n in sp.results:
        assert np.array_equal(sp.results[n].mask, sp2.results[n].mask)
        torch.testing.assert_close(_dense(sp2, model2, n), _dense(sp, model, n),
                                   rtol=0, atol=0)
    assert sp2.history == sp.history
    # Both continue alike: same step counter, layouts, values and optimizer state.
    for m, o, s in ((model, opt, sp), (model2, opt2, sp2)):
        _train(m, o, s, "mlp", 5)
    assert _strip(sp2.history) == _strip(sp.history) and len(sp.history) > 2 * 5
    for n in sp.results:
        assert np.array_equal(sp.results[n].mask, sp2.results[n].mask)
        assert torch.equal(_dense(sp2, model2, n), _dense(sp, model, n))
    # A masked state does not load into a block sparsifier (nor the reverse).
    _, _, masked = fresh(execution="masked")
    with pytest.raises(RegroupError, match="other settings: .*'execution': 'block'"):
        masked.load_state_dict(saved["sp"])


def test_convert_in_block_mode_finishes_and_keeps_the_modules():
    model = _convnet()
    opt = _opt(model, "adam")
    sp = RegroupDST(0.75, block=8, T=2, T_end=20, optimizer=opt, execution="block")
    sp.prepare(model)
    modules = [model[0], model[2], model[4]]
    _train(model, opt, sp, "conv", 4)
    x, _ = _data("conv")
    with torch.no_grad():
        ref = model(x)
    assert sp.convert(model, backend="dense") is model
    assert [model[0], model[2], model[4]] == modules
    assert sp.convert_report["0.weight"].startswith("BlockSparseConv2d (block-sparse since")
    assert sp.convert_report["4.weight"].startswith("BlockSparseLinear (block-sparse since")
    assert sp.convert_report["6.weight"].startswith("stays dense-masked: 4x32 is smaller")
    assert model[0].core.backend == "dense" and not hasattr(model[6], "parametrizations")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    assert not model[0]._forward_hooks
    with pytest.raises(RegroupError, match="converted"):
        sp.step()


def test_layers_a_parent_reads_directly_stay_masked():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.conv = nn.Conv2d(8, 16, 3, padding="same")
            self.fc = nn.Linear(16, 16)
            self.tied = nn.Linear(16, 16)
            self.head = nn.Linear(16, 16)
            self.head.weight = self.tied.weight

    net = Net()
    sp = RegroupDST(0.5, block=8, T=2, T_end=20, optimizer=_opt(net, "sgd"),
                    execution="block")
    sp.prepare(net)
    assert set(sp._block) == {"fc.weight"} and isinstance(net.fc, BlockSparseLinear)
    assert set(sp.masked) == {"attn.out_proj.weight", "conv.weight", "tied.weight",
                              "head.weight"}
    assert "tied" in sp.masked["head.weight"]
    assert sp.masked["attn.out_proj.weight"].startswith("nn.MultiheadAttention reads")
    assert "numeric padding" in sp.masked["conv.weight"]
    assert hasattr(net.conv, "parametrizations")


def _random_layout(shape, fmt, k, seed):
    """A layout of ``k`` random 8x8 units with random orders (short edges included)."""
    rng = np.random.default_rng(seed)
    u = make_units(shape, (8, 8), fmt, row_perm=rng.permutation(shape[0]),
                   col_perm=rng.permutation(shape[1]) if fmt == "grid" else None,
                   rank=None if fmt == "grid" else rng.standard_normal(shape))
    kept = np.zeros(u.n_units, bool)
    kept[rng.choice(u.n_units, k, replace=False)] = True
    lay = units_layout(u, kept.reshape(u.table_shape), np.zeros(u.table_shape))
    return LayerResult(name="w", shape=shape, mask=layout_mask(lay), row_perm=lay.row_perm,
                       col_perm=lay.col_perm, panel_cols=lay.panel_cols, block_shape=(8, 8),
                       format=fmt, method="identity")


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_set_layout_is_a_fresh_core_of_the_positions_kept_in_both(fmt):
    shape = (20, 44)                        # a short panel and short tiles
    a, b = _random_layout(shape, fmt, 7, 0), _random_layout(shape, fmt, 7, 1)
    torch.manual_seed(0)
    W = torch.randn(shape)
    core = BlockCore(a, W, "bsr")
    values = core.values
    state = torch.randn(values.shape)
    dense_state = core.to_dense(state)
    values.grad = torch.randn(values.shape)
    dense_grad = core.to_dense(values.grad)
    core.set_layout(b, (state,))
    both = torch.from_numpy(a.mask & b.mask)
    ref = BlockCore(b, W * both, "bsr")
    assert core.values is values and torch.equal(values, ref.values)
    assert torch.equal(core.to_dense(values), core.dense_weight())  # the two dense forms
    for key in LAYOUT_KEYS:
        assert torch.equal(getattr(core, key), getattr(ref, key))
    for key in ("in_index", "out_index", "crow", "col", "crow_t", "col_t", "perm_t"):
        x, y = getattr(core, key), getattr(ref, key)
        assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(core.to_dense(state), dense_state * both)
    assert torch.equal(core.to_dense(values.grad), dense_grad * both)
    x = torch.randn(5, 44)
    torch.testing.assert_close(core.sparse_matmul(x), x @ (W * both).t())
    with pytest.raises(RegroupError, match="keeping 7 of them; got .* 8 blocks"):
        core.set_layout(_random_layout(shape, fmt, 8, 2))
    assert torch.equal(values, ref.values)                          # left as it was


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_set_layout_remaps_a_tensor_once_and_on_its_own_device(fmt):
    shape = (20, 44)
    a, b = _random_layout(shape, fmt, 7, 0), _random_layout(shape, fmt, 7, 1)
    torch.manual_seed(0)
    core = BlockCore(a, torch.randn(shape), "bsr")
    state = torch.randn(core.values.shape)
    want = core.to_dense(state) * torch.from_numpy(a.mask & b.mask)
    # Listed twice (and as the values' grad): moved once. On the meta device (standing
    # in for optimizer state kept on another device than the values): moved there.
    core.values.grad = state
    offloaded = torch.empty(core.values.shape, device="meta")
    core.set_layout(b, (state, state, offloaded))
    assert torch.equal(core.to_dense(state), want)
    assert offloaded.device.type == "meta" and offloaded.shape == core.values.shape


def _real_pair(make, fqns, x, loss_of, steps):
    """Real architecture ``make()`` trained masked and block on ``x`` (Adam, 75 % ERK, an
    update with a re-layout every 2 steps, drop fraction ~0.5 so that units trade): the
    two (model, sparsifier) pairs after ``steps``."""
    runs = []
    for execution in ("masked", "block"):
        # float64: the block products sum in another order than the dense ones, and
        # Adam's first steps (g / |g|) would turn float32 rounding into whole steps
        model = make().double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sp = RegroupDST(0.75, block=16, format="shuffled", T=2, T_end=100, alpha=0.5,
                        relayout_every=1, optimizer=opt, execution=execution,
                        init="magnitude")
        sp.prepare(model, [{"tensor_fqn": f} for f in fqns])
        if execution == "block":
            set_backend(model, "bsr")          # the block products, not dense fallbacks
        for _ in range(steps):
            opt.zero_grad()
            loss_of(model(x)).backward()
            opt.step()
            sp.step()
        runs.append((model, sp))
    return runs


def _assert_same_training(runs, fqns):
    (m_masked, s_masked), (m_block, s_block) = runs
    _same_history(s_masked.history, s_block.history)
    assert any(r["relayout"] for r in s_block.history) and \
        any(r["grown"] for r in s_block.history)
    blocked = 0
    for fqn in fqns:
        np.testing.assert_array_equal(s_masked.results[fqn].mask, s_block.results[fqn].mask)
        a, b = _dense(s_masked, m_masked, fqn), _dense(s_block, m_block, fqn)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        blocked += isinstance(m_block.get_submodule(fqn.rpartition(".")[0]),
                              (BlockSparseLinear, BlockSparseConv2d))
    assert blocked > 0


def test_block_execution_trains_as_the_masked_one_on_mobilenet_v2(real_mobilenet):
    # ImageNet weights, the 1x1 convolutions of the first blocks; the updates move
    # values and Adam state between layouts (BlockCore.set_layout) in the block run.
    probe = real_mobilenet()
    fqns = [f"{n}.weight" for n, m in probe.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1][:8]
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    runs = _real_pair(real_mobilenet, fqns, x, lambda out: out.square().mean(), 6)
    _assert_same_training(runs, fqns)


def test_block_execution_trains_as_the_masked_one_on_a_transformer_encoder():
    # nn.TransformerEncoder (its default sequence-first layout, which has no fused fast
    # path): the feed-forward Linears run block-sparse; the attention's out_proj, read by
    # its parent directly, stays masked in both executions.
    def make():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    fqns = [f"layers.{i}.{n}.weight" for i in range(2)
            for n in ("linear1", "linear2", "self_attn.out_proj")]
    x = torch.randn(10, 4, 64, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    runs = _real_pair(make, fqns, x, lambda out: out.square().mean(), 6)
    _assert_same_training(runs, fqns)
    assert {f for f in fqns if "out_proj" in f} <= set(runs[1][1].masked)


def test_block_execution_trains_as_the_masked_one_on_minilm(real_minilm):
    # Hugging Face BERT (all-MiniLM-L6-v2's first layer, its real weights): the
    # feed-forward and attention-output Linears.
    tokenizer = real_minilm(1)[1]
    enc = tokenizer(["a sparse network trains block by block", "tiles move between rows"],
                    padding=True, return_tensors="pt")
    fqns = [f"encoder.layer.0.{n}.weight" for n in
            ("intermediate.dense", "output.dense", "attention.output.dense")]

    # (eval mode: no dropout, whose draws would differ between the two runs)
    runs = _real_pair(lambda: real_minilm(1)[0].eval(), fqns, enc["input_ids"],
                      lambda out: out.last_hidden_state.square().mean(), 6)
    _assert_same_training(runs, fqns)


@pytest.mark.parametrize("bad", ["Block", "dense", None, 1, ["block"]])
def test_bad_execution_is_refused(bad):
    with pytest.raises(ValueError, match=r"^The 'execution' parameter of RegroupDST must "
                       r"be one of 'block', 'masked'\. Got .* instead\.$") as info:
        RegroupDST(0.9, T_end=100, execution=bad)
    assert repr(bad) in str(info.value)
    assert RegroupDST(0.9, T_end=100).execution == "masked"
    with pytest.raises(ValueError, match=r"^The 'optimizer' parameter of RegroupDST must be "
                       r"a torch\.optim\.Optimizer with execution='block' .* Got None"):
        RegroupDST(0.9, T_end=100, execution="block")

