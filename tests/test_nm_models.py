"""N:M on PyTorch models (issue 14, the model side): orders folded into the producing layers
so the consumers' masks are N:M in plain order, NMLinear modules, the prune / ao hooks.

Every transformed model must compute what the same masked model computes unpermuted."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (NMLinear, Plan, RegroupBlocks,  # noqa: E402
                                    RegroupSparsifier, block_layout, imp_regroup,
                                    load_block_sparse, regroup_model, regroup_unstructured,
                                    save_block_sparse, to_block_sparse)
from regroup.adapters.torch.semi_structured import semi_structured_problem  # noqa: E402
from regroup.nm import check_nm_mask, nm_mask, nm_retained  # noqa: E402

TOL = 1e-5          # relative to the output's largest magnitude, fp32


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= TOL, f"relative error {err:.2e}"


def _module_weight(model: nn.Module, name: str) -> np.ndarray:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr).detach().numpy()


def _check_nm_model(make, inputs, output, tmp_path, nm=(2, 4), **kwargs):
    """Plan N:M on a fresh ``make()``, check it against an unpermuted copy with the same
    masks (folded, NMLinear modules, re-applied from the saved plan) and that every
    layer's weight is N:M after its current column order."""
    model, ref = make(), make()
    plan = regroup_model(model, format="nm", nm=nm, example_inputs=inputs, **kwargs)
    plan.apply(ref, permute=False)
    with torch.no_grad():
        want = output(ref(*inputs))
        _close(output(model(*inputs)), want)
    for name, side in plan.sides.items():
        r = plan.current_result(name)
        check_nm_mask(_module_weight(model, name).reshape(r.shape[0], -1) != 0, nm,
                      r.col_perm)
        if side["cols"] == "fold":           # N:M in plain order: no gather at run time
            np.testing.assert_array_equal(r.col_perm, np.arange(r.mask2d.shape[1]))
        else:
            assert isinstance(side.get("why_cols"), str) and side["why_cols"].strip()
    path = tmp_path / "plan.regroup.npz"
    plan.save(path)
    fresh = make()
    Plan.load(path).apply(fresh)
    with torch.no_grad():
        _close(output(fresh(*inputs)), want)
    done = to_block_sparse(model, plan)
    with torch.no_grad():
        _close(output(model(*inputs)), want)
    # Saved with its layouts, reloaded into a fresh dense model without the plan.
    save_block_sparse(model, tmp_path / "nm.safetensors")
    reloaded = make()
    loaded = load_block_sparse(reloaded, tmp_path / "nm.safetensors")
    assert {k: v for k, v in done.items() if v == "NMLinear"} == \
        {k: v for k, v in loaded.items() if v == "NMLinear"}
    with torch.no_grad():
        _close(output(reloaded(*inputs)), want)
    return plan, done


# -- toy models: every side of the fold ---------------------------------------------------
class Chain(nn.Module):
    """Linear -> ReLU -> Linear -> LayerNorm -> Linear, and a 1x1 conv head elsewhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 96)
        self.norm = nn.LayerNorm(96)
        self.c = nn.Linear(96, 32)

    def forward(self, x):
        return self.c(self.norm(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_folded_nm_chain_is_exact_and_nm_in_plain_order(nm, tmp_path):
    torch.manual_seed(0)
    base = Chain()
    for m in (base.a, base.b, base.c, base.norm):           # norms that are not identities
        nn.init.normal_(m.weight)
    x = torch.randn(5, 64)
    plan, done = _check_nm_model(lambda: copy.deepcopy(base), (x,), lambda y: y, tmp_path,
                                 nm=nm)
    assert [f.producers for f in plan.folds] == [["a"], ["b"]]
    assert plan.folds[1].norms == ["norm"]
    assert {n: s["cols"] for n, s in plan.sides.items()} == {
        "a.weight": "runtime", "b.weight": "fold", "c.weight": "fold"}
    assert done == dict.fromkeys(plan.sides, "NMLinear")
    # The folded order was searched for the layer: it keeps more than plain N:M.
    r = plan.layers["b.weight"]
    assert r.metrics["retained_magnitude"] > r.metrics["retained_magnitude_identity"]


def test_runtime_nm_plan_gathers_inputs_and_matches(tmp_path):
    torch.manual_seed(1)
    base = Chain()
    x = torch.randn(3, 7, 64)                                # a leading batch of 3 x 7
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    plan = regroup_model(model, format="nm", mode="runtime")
    assert not plan.folds and all(s["why_cols"] == "mode='runtime'"
                                  for s in plan.sides.values())
    plan.apply(ref, permute=False)
    to_block_sparse(model, plan, backend="dense")
    gathers = [m for m in model.modules() if isinstance(m, NMLinear) and not m.identity]
    assert len(gathers) == 3                    # each layer kept its own searched order
    with torch.no_grad():
        _close(model(x), ref(x))


def test_kxk_convolution_consumers_leave_the_dimension_unfolded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 32, 1)
            self.b = nn.Conv2d(32, 16, 3, padding=1)
            self.c = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 8, 6, 6)
    ref = copy.deepcopy(model)
    plan = regroup_model(model, format="nm", example_inputs=(x,))
    assert "3x3 convolution 'b'" in plan.sides["b.weight"]["why_cols"]
    assert plan.sides["c.weight"]["cols"] == "fold"          # a 1x1 conv's input folds
    assert [f.producers for f in plan.folds] == [["b"]]
    plan.apply(ref, permute=False)
    with torch.no_grad():
        _close(model(x), ref(x))
    done = to_block_sparse(model, plan)
    assert all(v.startswith("stays dense-masked: torch's N:M (2:4) kernels multiply")
               for v in done.values()), done
    with torch.no_grad():
        _close(model(x), ref(x))


def test_layers_whose_columns_do_not_split_into_groups_are_skipped():
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8))
    plan = regroup_model(model, format="nm", mode="runtime")
    assert "divisible by 4" in plan.skipped["0.weight"]
    assert list(plan.layers) == ["2.weight"]


def test_calibrated_nm_ranks_by_weight_times_input_norm():
    """Wanda's N:M score: with calibration, N:M keeps |w_ij| * ||x_j||, not |w_ij|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(64, 16) * torch.linspace(0.01, 10, 16)
    plan = regroup_model(model, format="nm", mode="runtime", calibration=[(x,)])
    norms = x.norm(dim=0).numpy()
    w = model[0].weight_orig.detach().numpy()
    score = np.abs(w) * norms / norms.mean()
    r = plan.layers["0.weight"]
    np.testing.assert_array_equal(r.mask2d, nm_mask(score, (2, 4), r.col_perm))
    assert not np.array_equal(r.mask2d, nm_mask(np.abs(w), (2, 4), r.col_perm))
    assert np.isclose(r.metrics["retained_magnitude"],
                      nm_retained(score, (2, 4), r.col_perm) / score.sum())


# -- NMLinear ------------------------------------------------------------------------------
def _layout(w: torch.Tensor, seed: int = 0):
    model = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        model.weight.copy_(w)
    RegroupBlocks.apply(model, "weight", None, layer="w", format="nm", seed=seed)
    return block_layout(model), model


def test_nm_linear_refuses_what_it_cannot_run():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    r, _ = _layout(w)
    with pytest.raises(ValueError, match="'backend' parameter of NMLinear must be one of"):
        NMLinear(r, w, backend="bsr")
    with pytest.raises(RegroupError, match="the layout has shape"):
        NMLinear(r, w[:, :32])
    from dataclasses import replace
    dense = replace(r, mask=np.ones(r.shape, bool))
    with pytest.raises(RegroupError, match="is not 2:4 after col_perm"):
        NMLinear(dense, w)
    lin = NMLinear(r, w, backend="semi_structured")
    with torch.no_grad(), pytest.raises(RegroupError, match="need CUDA"):
        lin(torch.randn(2, 64))
    with pytest.raises(RegroupError, match="inference only"):
        NMLinear(r, w, backend="semi_structured")(torch.randn(2, 64).requires_grad_())
    cpu = torch.device("cpu")
    assert "2:4 only" in semi_structured_problem((1, 4), (32, 64), cpu, torch.float16)
    assert "need CUDA" in semi_structured_problem((2, 4), (32, 64), cpu, torch.float16)


def test_nm_linear_trains_and_keeps_its_pattern():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    r, _ = _layout(w)
    lin = NMLinear(r, w, torch.zeros(32))
    x = torch.randn(8, 64)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().mean().backward()
        opt.step()
    kept = (lin.dense_weight() != 0).numpy()
    check_nm_mask(kept, (2, 4), r.col_perm)
    assert (kept <= r.mask2d).all()
    assert lin.dispatch_log == {}                    # the CPU has one path: nothing timed


# -- prune / ao hooks -----------------------------------------------------------------------
def test_prune_method_nm_then_plan_from_result_runs_nmlinear():
    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    ref = copy.deepcopy(lin)
    regroup_unstructured(lin, amount=0.3, format="nm", nm="2:4")
    r = block_layout(lin)
    assert r.format == "nm"
    check_nm_mask(lin.weight_mask.numpy(), (2, 4), r.col_perm)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = lin(x)
        # N:M of the 30 %-pruned weight: every kept weight survived the magnitude step
        # or refills a slot of a group with fewer than 2 survivors.
        assert torch.equal(lin.weight[lin.weight_mask.bool()],
                           ref.weight[lin.weight_mask.bool()])
    model = nn.Sequential(lin)
    plan = Plan.from_result({"0.weight": r})
    assert plan.sides["0.weight"]["cols"] == "runtime"
    assert to_block_sparse(model, plan) == {"0.weight": "NMLinear"}
    with torch.no_grad():
        _close(model(x), want)


def test_sparsifier_nm_on_dense_weights():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    sparsifier = RegroupSparsifier(format="nm", nm="1:4")
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    for fqn in ("0.weight", "2.weight"):
        r = sparsifier.results[fqn]
        mask = model.get_submodule(fqn[0]).parametrizations.weight[0].mask.numpy()
        check_nm_mask(mask, (1, 4), r.col_perm)
        assert mask.sum() == mask.size // 4


def test_imp_regroup_refuses_nm_with_the_reason():
    with pytest.raises(ValueError, match="IMP prunes to a rising sparsity"):
        imp_regroup(nn.Linear(8, 8), lambda m, r: None, rounds=1, sparsity=0.5, format="nm")


# -- real pretrained models ---------------------------------------------------------------
def _is_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def test_mobilenet_nm_folds_through_depthwise_convolutions(real_mobilenet, zoo, tmp_path):
    """ASP's usual input: the dense ImageNet MobileNetV2, 1x1 convs pruned to 2:4; the
    project convs' input orders fold into the expand convs through the depthwise convs
    and their BatchNorms."""
    model = real_mobilenet()
    # The first six blocks (residual joins among them): the whole model runs, the
    # searches stay short (the 1000 x 1280 classifier alone takes seconds).
    ones = [f"{n}.weight" for n, m in model.named_modules()
            if _is_1x1(m) and int(n.split(".")[1]) <= 6]
    x = zoo.photo_crops(2, size=64)
    plan, done = _check_nm_model(real_mobilenet, (x,), lambda y: y, tmp_path,
                                 layers=ones, time_limit=0.1)
    project = [n for n in ones if n.endswith("conv.2.weight") or
               (n.endswith("conv.1.weight") and "features.1." in n)]
    assert len(project) == 6
    assert [n for n in project if plan.sides[n]["cols"] != "fold"] == []
    carried = {n for f in plan.folds for n in f.norms}
    assert {f"features.{i}.conv.1.0" for i in range(2, 7)} <= carried   # depthwise convs
    assert sorted(done) == sorted(ones) and all(
        v.startswith("stays dense-masked: torch's N:M (2:4) kernels") for v in done.values())


def test_bert_feed_forward_nm_folds(real_minilm, tmp_path):
    _, tokenizer = real_minilm(1)
    ids = tokenizer(["N:M groups run along the input columns.", "Fold them."],
                    padding=True, return_tensors="pt")["input_ids"]
    with pytest.warns(RuntimeWarning, match="could not trace BertModel"):
        plan, done = _check_nm_model(lambda: real_minilm(1)[0], (ids,),
                                     lambda y: y.last_hidden_state, tmp_path,
                                     layers="encoder.*", time_limit=0.1)
    assert plan.sides["encoder.layer.0.output.dense.weight"]["cols"] == "fold"
    assert plan.sides["encoder.layer.0.attention.self.query.weight"]["cols"] == "runtime"
    assert set(done.values()) == {"NMLinear"} and len(done) == 6


def test_transformer_encoder_nm_keeps_attention_dense_masked(zoo, tmp_path):
    pytest.importorskip("safetensors")
    try:
        zoo.minilm_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    x = torch.randn(2, 9, 384, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="could not trace TransformerEncoder"):
        plan, done = _check_nm_model(lambda: zoo.minilm_torch_encoder(1), (x,), lambda y: y,
                                     tmp_path, time_limit=0.1)
    assert plan.sides["layers.0.linear2.weight"]["cols"] == "fold"
    for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight"):
        assert done[f"layers.0.{w}"].startswith("stays dense-masked: N:M inside a "
                                                 "MultiheadAttention"), done
    # Its fused fast path reads the feed-forward weights while self_attn stays dense.
    for w in ("linear1.weight", "linear2.weight"):
        assert "fused fast path" in plan.dense[f"layers.0.{w}"]
        assert "(N:M does not replace it)" in done[f"layers.0.{w}"]


@pytest.mark.parametrize("tamper, message", [
    (lambda s: s.__setitem__("b.col_gather", s["b.col_gather"].flip(0)[:-1]),
     "not a permutation"),
    (lambda s: s.__setitem__("b.mask", torch.ones_like(s["b.mask"])), "is not 2:4"),
    (lambda s: s.__setitem__("b.nm", torch.tensor([4, 2])), "has nm"),
    (lambda s: s.__setitem__("b.mask", s["b.mask"].float() * 2), "not 0/1"),
    (lambda s: s.pop("b.col_gather"), "unexpected"),      # not an N:M layer any more
])
def test_load_refuses_tampered_nm_layers(tamper, message):
    torch.manual_seed(5)
    base = Chain()
    model = copy.deepcopy(base)
    plan = regroup_model(model, format="nm", mode="runtime", time_limit=0.2)
    to_block_sparse(model, plan)
    state = dict(model.state_dict())
    tamper(state)
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RegroupError, match=message):
        load_block_sparse(fresh, state)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


@pytest.mark.parametrize("semi_ms, chosen", [(0.5, "semi_structured"), (0.99, "dense")])
def test_auto_picks_the_2to4_path_only_when_measured_faster(monkeypatch, semi_ms, chosen):
    """The CUDA path's logic on the CPU: torch's compressed tensor replaced by the permuted
    dense weight it stands for, so the gathered product must equal the dense one, and the
    choice follows the (faked) timing with the margin."""
    from regroup.adapters.torch import semi_structured
    monkeypatch.setattr(semi_structured, "semi_structured_problem", lambda *a: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    monkeypatch.setattr(semi_structured, "time_paths", lambda run, paths, budget, device: (
        {p: run(p) is not None and {"dense": 1e-3, "semi_structured": semi_ms * 1e-3}[p]
         for p in paths}, 3, 0.01))
    torch.manual_seed(6)
    w = torch.randn(32, 64)
    r, _ = _layout(w)
    lin = NMLinear(r, w, torch.randn(32))
    assert not lin.identity                      # a real gather
    x = torch.randn(4, 5, 64)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, lin.dense_weight(), lin.bias)
        _close(lin._run(x.reshape(-1, 64), "semi_structured").reshape(4, 5, 32), want)
        _close(lin(x), want)
    assert list(lin.dispatch_log.values()) == [chosen]
    _close(lin(x).detach(), want)                # with grad: dense, nothing timed again
    assert len(lin.dispatch_log) == 1


def test_masks_already_nm_keep_their_order_and_values():
    """torch.ao's WeightNormSparsifier(zeros_per_block=2) leaves 2:4 masks (as SR-STE
    training does): read as the input, they are already optimal, so the plan keeps them
    and their plain order (no gather, nothing refilled)."""
    from torch.ao.pruning import WeightNormSparsifier
    from regroup.adapters.torch import layer_masks
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4),
                                      zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    before = {k: v[1].clone().numpy() for k, v in layer_masks(model).items()}
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    plan = regroup_model(model, format="nm", example_inputs=(x,))
    for name, r in plan.layers.items():
        check_nm_mask(before[name], (2, 4), None)
        np.testing.assert_array_equal(r.mask2d, before[name])
        np.testing.assert_array_equal(r.col_perm, np.arange(r.mask2d.shape[1]))
        assert r.metrics["retained_magnitude"] == 1.0
    with torch.no_grad():
        assert torch.equal(model(x), want)
