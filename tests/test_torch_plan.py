"""regroup_model / Plan / to_block_sparse on the model zoo: exactness, folding, round trips."""
import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import regroup  # noqa: E402
from regroup import RegroupError, RegroupOptions  # noqa: E402
from regroup.adapters.torch import (BlockSparseLinear,  # noqa: E402
                                    BlockSparseMultiheadAttention, Plan, fold_marker,
                                    hidden_dims,
                                    layer_masks, prepare_for_load, regroup_model,
                                    to_block_sparse)
from tests.torch_zoo import pruned, zoo  # noqa: E402

ATOL = 1e-5


def _masked_reference(name, plan, seed=0):
    """The same pruned model with the plan's refilled masks, nothing permuted."""
    ref, x = pruned(name, seed)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for lname, r in plan.layers.items():
            modules[lname[:-len(".weight")]].weight_mask.copy_(torch.from_numpy(r.mask))
    return ref, x


@pytest.mark.parametrize("name", sorted(zoo()))
@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("mode", ["fold", "runtime"])
def test_regrouped_model_computes_the_masked_model(name, fmt, mode):
    model, x = pruned(name)
    plan = regroup_model(model, block=16, format=fmt, mode=mode, example_inputs=(x,),
                         method="metis")
    ref, _ = _masked_reference(name, plan)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)
    for backend in ("bsr", "dense", "auto"):
        sparse = copy.deepcopy(model)
        done = to_block_sparse(sparse, plan, backend=backend)
        assert set(done.values()) <= {"BlockSparseLinear", "BlockSparseConv2d"}
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("block", [(16, 16), (8, 16)])
def test_folds_refined_jointly_stay_exact(name, block):
    """With refinement, the folded orders are refined over the layers sharing them
    (refine_shared); non-square blocks freeze the folds read by both block sides."""
    model, x = pruned(name)
    plan = regroup_model(model, block=block, mode="fold", example_inputs=(x,),
                         method="sort", refine=True, chain=None)
    if block == (16, 16) and name == "mlp":
        assert any(n.startswith("folded orders refined jointly") for n in plan.notes)
        assert any("shared_gain" in r.metrics for r in plan.layers.values())
    ref, _ = _masked_reference(name, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)
    sparse = copy.deepcopy(model)
    to_block_sparse(sparse, plan, backend="bsr" if block[0] == block[1] else "dense")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), ref(x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name, folds, folded_layers", [
    ("mlp", 2, {"layers.0.weight": ("fold", "runtime"), "layers.1.weight": ("fold", "fold")}),
    ("transformer", 1, {"fc1.weight": ("fold", "runtime"), "fc2.weight": ("runtime", "fold"),
                        "attn.q.weight": ("runtime", "runtime")}),
])
def test_fold_finds_the_exact_hidden_dimensions(name, folds, folded_layers):
    model, x = pruned(name)
    plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    assert len(plan.folds) == folds
    for layer, (rows, cols) in folded_layers.items():
        assert (plan.sides[layer]["rows"], plan.sides[layer]["cols"]) == (rows, cols)
    # A folded side needs nothing at run time: its current order is the identity.
    for layer, side in plan.sides.items():
        cur = plan.current_result(layer)
        if side["rows"] == "fold":
            assert np.array_equal(cur.row_perm, np.arange(cur.row_perm.size))
        if side["cols"] == "fold":
            assert np.array_equal(cur.col_perm, np.arange(cur.col_perm.size))
        for s in ("rows", "cols"):
            assert (side[s] == "runtime") == ("why_" + s in side)


def test_cnn_residual_stream_folds_through_batchnorm():
    model, x = pruned("cnn")
    dims = hidden_dims(model, (x,))
    stream = [d for d in dims.dims if "block.conv2" in d.producers]
    assert len(stream) == 1 and stream[0].foldable
    assert set(stream[0].producers) == {"stem", "block.conv2"}
    assert set(stream[0].consumers) == {"block.conv1", "down"}
    assert set(stream[0].norms) == {"bn", "block.bn2"}
    head = [d for d in dims.dims if "head" in d.producers][0]
    assert not head.foldable and "it is a model output" in head.reasons


def test_runtime_mode_leaves_parameters_in_place():
    model, x = pruned("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
    plan = regroup_model(model, block=16, mode="runtime", method="metis")
    assert plan.folds == []
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_plan_round_trip_reapplies_without_recomputing(tmp_path, monkeypatch):
    model, x = pruned("cnn")
    plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    path = tmp_path / "cnn.regroup.npz"
    plan.save(path)
    import regroup
    monkeypatch.setattr(regroup, "regroup_pattern", None)     # any recomputation fails
    loaded = Plan.load(path)
    assert loaded.sides == plan.sides and loaded.options == plan.options
    assert [f.perm.tolist() for f in loaded.folds] == [f.perm.tolist() for f in plan.folds]
    fresh, _ = pruned("cnn")
    loaded.apply(fresh)
    sd, sd2 = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    with pytest.raises(RegroupError, match="already permuted by a folding"):
        loaded.apply(fresh)


def test_plan_load_refuses_a_run_result(tmp_path):
    import regroup
    w = np.random.default_rng(0).standard_normal((32, 32)) * (
        np.random.default_rng(1).random((32, 32)) < 0.2)
    r = regroup.regroup_pattern(regroup.from_array(w, name="fc.weight"), block=16,
                                method="sort")
    regroup.save_result(tmp_path / "r.npz", [r])
    with pytest.raises(RegroupError, match="without a model plan"):
        Plan.load(tmp_path / "r.npz")


def test_ao_pruning_masks_are_updated_in_place():
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4),
                                      zeros_per_block=4)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(5, 40)
    ref = copy.deepcopy(model)
    plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    assert set(plan.layers) == {"0.weight", "2.weight"}
    assert plan.skipped == {"4.weight": "fully dense (no zero): not pruned"}
    for fqn in ("0.weight", "2.weight"):
        mod = model[int(fqn[0])]
        mask = sparsifier.state[fqn]["mask"]
        assert mask is mod.parametrizations.weight[0].mask
        assert torch.equal(mask.bool(), torch.from_numpy(plan.current_result(fqn).mask))
        ref_mod = ref[int(fqn[0])]
        ref_mod.parametrizations.weight[0].mask.copy_(torch.from_numpy(plan.layers[fqn].mask))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)


def test_zero_weights_are_read_as_the_mask_and_rewind_refills():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    early = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    masks = layer_masks(model)
    assert masks["0.weight"][2] == "zeros"
    plan = regroup_model(model, block=16, mode="runtime", method="metis",
                         rewind={"0.weight": early["0.weight"]})
    # Refilled from the rewind values, zero outside the blocks.
    mask0 = torch.from_numpy(plan.layers["0.weight"].mask)
    assert torch.equal(model[0].weight, early["0.weight"] * mask0)
    # Without rewind a plain weight keeps its zeros inside blocks (nothing to refill from).
    mask2 = torch.from_numpy(plan.layers["2.weight"].mask)
    assert torch.equal(model[2].weight_mask.bool(), mask2)


def test_fold_mode_needs_example_inputs():
    model, _ = pruned("mlp")
    with pytest.raises(RegroupError, match="pass example_inputs"):
        regroup_model(model, block=16)


def test_untraceable_model_says_so_and_uses_runtime_permutations():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if h.sum() > 0:                     # data-dependent control flow: fx cannot trace
                h = h * 2
            return self.b(h)

    torch.manual_seed(0)
    model = Branchy()
    with torch.no_grad():
        for m in (model.a, model.b):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    x = torch.randn(4, 32)
    with pytest.warns(RuntimeWarning, match="could not trace Branchy"):
        plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    assert plan.folds == [] and any("could not trace" in n for n in plan.notes)
    assert all(s["rows"] == "runtime" and "could not be traced" in s["why_rows"]
               for s in plan.sides.values())
    expected = model(x)
    to_block_sparse(model, plan, backend="bsr")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)


def test_mha_out_proj_converts_with_its_attention_and_direct_weight_reads_stay_dense():
    """fold mode: MultiheadAttention is a leaf for torch.fx, so its out_proj is never seen
    called; it is converted with its attention module all the same. A layer whose weight
    the model reads itself (F.linear on it) stays dense, with the trace's reason."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.fc = nn.Linear(32, 32)
            self.tied = nn.Linear(32, 32)

        def forward(self, x):
            h = self.fc(self.attn(x, x, x)[0])
            return nn.functional.linear(h, self.tied.weight)

    torch.manual_seed(0)
    model = WithMHA().eval()
    with torch.no_grad():
        for m in (model.attn.out_proj, model.fc, model.tied):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    x = torch.randn(2, 3, 32)
    plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    assert "attn.in_proj_weight" in plan.skipped            # not pruned: nothing to regroup
    assert "attn.out_proj.weight" in plan.layers and "attn.out_proj.weight" not in plan.dense
    assert "torch.fx does not trace into" in plan.sides["attn.out_proj.weight"]["why_rows"]
    assert plan.dense["tied.weight"].startswith("not called as a module")
    assert any(n.startswith("tied: not called as a module") for n in plan.notes)
    assert "stays dense tied.weight: not called as a module" in plan.report()
    expected = model(x)
    done = to_block_sparse(model, plan)
    assert done["attn.out_proj.weight"] == "BlockSparseMultiheadAttention"
    assert done["fc.weight"] == "BlockSparseLinear"
    assert done["tied.weight"].startswith("stays dense-masked: not called as a module")
    assert isinstance(model.attn, BlockSparseMultiheadAttention)
    assert isinstance(model.attn.out_proj, BlockSparseLinear)
    assert type(model.attn.in_proj) is nn.Linear             # not planned: dense inside
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)


def _small_encoder(batch_first: bool, nested: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) < 0.25)
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.mul_(torch.rand_like(m.in_proj_weight) < 0.25)
    return enc


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_feed_forward_alone_is_converted_only_when_the_fast_path_is_off(batch_first):
    """With a dense self_attn, TransformerEncoderLayer's fused fast path (batch_first)
    reads linear1/linear2.weight as tensors: they stay dense, with the reason."""
    enc = _small_encoder(batch_first)
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    plan = regroup_model(enc, block=8, mode="runtime", layers="*.linear*", method="sort")
    assert len(plan.layers) == 4
    assert (len(plan.dense) == 4) == batch_first
    with torch.no_grad():
        expected = enc(x)
        done = to_block_sparse(enc, plan, backend="bsr")
        got = enc(x)
    for name, what in done.items():
        if batch_first:
            assert what.startswith("stays dense-masked: TransformerEncoderLayer"), name
            assert "fused fast path" in what
        else:
            assert what == "BlockSparseLinear", name
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_encoder_is_switched_to_padded_and_says_so():
    enc = _small_encoder(True, nested=True)
    assert enc.use_nested_tensor
    x = torch.randn(2, 6, 32)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    plan = regroup_model(enc, block=8, mode="runtime", method="sort")
    assert "layers.0.self_attn.in_proj_weight" in plan.layers
    with torch.no_grad():
        expected = enc(x, src_key_padding_mask=kpm)
        done = to_block_sparse(enc, plan, backend="bsr")
        got = enc(x, src_key_padding_mask=kpm)
    assert not enc.use_nested_tensor
    assert done["use_nested_tensor"].startswith("set to False: the nested-tensor path")
    assert set(done.values()) - {done["use_nested_tensor"]} == {
        "BlockSparseMultiheadAttention", "BlockSparseLinear"}
    keep = ~kpm        # the nested path leaves padded positions at 0
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=ATOL)


def test_layers_glob_and_nothing_to_do():
    model, x = pruned("mlp")
    plan = regroup_model(model, block=16, example_inputs=(x,), layers="layers.1.weight",
                         method="metis")
    assert list(plan.layers) == ["layers.1.weight"]
    assert plan.options.layers == ("layers.1.weight",)
    # Globs over weight names, as everywhere: a module name matches no weight.
    model, x = pruned("mlp")
    plan = regroup_model(model, block=16, example_inputs=(x,), layers=["layers.*", "nope"],
                         method="metis")
    assert list(plan.layers) == ["layers.0.weight", "layers.1.weight"]
    model, x = pruned("mlp")
    with pytest.raises(RegroupError, match=r"MLP: no layer matches .*'layers\.1'.*"
                                           r"layers\.0\.weight, layers\.1\.weight, head"):
        regroup_model(model, block=16, example_inputs=(x,), layers="layers.1")
    dense = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(RegroupError, match="no pruned Linear or Conv2d"):
        regroup_model(dense, block=16, mode="runtime")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'mode' parameter of regroup_model"):
            regroup_model(model, mode="sideways")


def test_a_cli_result_file_becomes_a_runtime_plan(tmp_path):
    """regroup run on a saved pruned checkpoint, then the layouts applied to the live model
    and run block-sparse."""
    from regroup.cli import main
    model, x = pruned("cnn")
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    out = tmp_path / "cnn.regroup.npz"
    assert main(["run", str(tmp_path / "cnn.pt"), "-o", str(out), "--block", "16",
                 "--method", "metis", "-q"]) == 0
    plan = Plan.from_result(out)
    assert plan.folds == [] and set(plan.layers) >= {"block.conv1.weight", "fc.weight"}
    assert all(s["rows"] == "runtime" for s in plan.sides.values())
    plan.apply(model)
    ref, _ = _masked_reference("cnn", plan)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)
    to_block_sparse(model, plan, backend="bsr")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)


def test_a_folded_state_dict_carries_the_fold_marker(tmp_path):
    """The marker is a buffer: a fresh instance prepared for it and loaded with the folded
    state dict refuses a second fold, and runs block-sparse under the same plan."""
    model, x = pruned("mlp")
    plan = regroup_model(model, block=16, example_inputs=(x,), method="metis")
    assert plan.folds and fold_marker(model) != 0
    plan.save(tmp_path / "mlp.regroup.npz")
    folded = model.state_dict()
    assert folded["regroup_folded"].shape == () and int(folded["regroup_folded"]) != 0
    torch.save(folded, tmp_path / "mlp.pt")
    with torch.no_grad():
        expected = model(x)

    fresh, _ = pruned("mlp")
    assert fold_marker(fresh) == 0
    with pytest.raises(RuntimeError, match="regroup_folded"):      # strict: not registered
        fresh.load_state_dict(folded)
    fresh, _ = pruned("mlp")
    assert prepare_for_load(fresh) is fresh and fold_marker(fresh) == 0
    fresh.load_state_dict(torch.load(tmp_path / "mlp.pt", weights_only=True))
    assert fold_marker(fresh) == fold_marker(model)
    loaded = Plan.load(tmp_path / "mlp.regroup.npz")
    snapshot = {k: v.clone() for k, v in fresh.state_dict().items()}
    for attempt in (lambda: plan.fold(fresh), lambda: plan.apply(fresh),
                    lambda: loaded.apply(fresh), lambda: loaded.fold(fresh),
                    lambda: Plan.from_result(tmp_path / "mlp.regroup.npz").apply(fresh),
                    lambda: regroup_model(fresh, block=16, example_inputs=(x,))):
        with pytest.raises(RegroupError, match="already permuted by a folding regroup plan"):
            attempt()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    # to_block_sparse reads the same marker: the plan that folded it (saved and loaded)
    # runs it; a plan with other folds, or none, is refused.
    other, _ = pruned("mlp", seed=1)
    other_plan = regroup_model(other, block=16, example_inputs=(x,), method="metis",
                               permute=False)
    with pytest.raises(RegroupError, match="permuted by another folding plan"):
        to_block_sparse(copy.deepcopy(fresh), other_plan)
    with pytest.raises(RegroupError, match="this plan keeps the original order"):
        to_block_sparse(copy.deepcopy(fresh), Plan.from_result(tmp_path / "mlp.regroup.npz"))
    with pytest.raises(RegroupError, match="call plan.fold"):
        to_block_sparse(other, other_plan)
    to_block_sparse(fresh, loaded, backend="bsr")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=ATOL)


def test_options_record_and_keywords():
    """options= and keyword fields are one set; errors name regroup_model and come before
    the model is touched."""
    model, x = pruned("mlp")
    opts = RegroupOptions(block=16, method="metis", seed=3)
    a = regroup_model(pruned("mlp")[0], options=opts, example_inputs=(x,))
    b = regroup_model(pruned("mlp")[0], block=16, method="metis", seed=3,
                      example_inputs=(x,))
    c = regroup_model(pruned("mlp")[0], options=opts.replace(block=32),
                      example_inputs=(x,), block=16)          # keywords override options
    # the plan records what chain="auto" became (traced, per-layer budget: on)
    assert a.options == b.options == c.options == opts.replace(chain=0.01)
    assert a.mode == "fold"
    for name in a.layers:
        assert np.array_equal(a.layers[name].mask, b.layers[name].mask)
        assert np.array_equal(a.layers[name].mask, c.layers[name].mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'block' parameter of regroup_model"):
        regroup_model(model, block=0, example_inputs=(x,))
    with pytest.raises(ValueError, match="'budget' parameter of regroup_model"):
        regroup_model(model, options=opts, budget="half", example_inputs=(x,))
    with pytest.raises(TypeError, match="regroup_model got unexpected keyword argument"):
        regroup_model(model, blocks=16, example_inputs=(x,))
    with pytest.raises(TypeError, match="'options' parameter of regroup_model must be a "
                                        "RegroupOptions"):
        regroup_model(model, options={"block": 16}, example_inputs=(x,))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_saved_plan_records_its_options_and_is_inspectable(tmp_path, capsys):
    from regroup.cli import main
    model, x = pruned("cnn")
    plan = regroup_model(model, block=16, method="metis", budget="iso=1.5",
                         example_inputs=(x,))
    path = tmp_path / "cnn.regroup.npz"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.options == plan.options and loaded.options.budget == plan.options.budget
    assert str(loaded.options.budget) == "iso=1.5" and loaded.mode == "fold"
    assert Plan.from_result(path).options == plan.options
    assert main(["inspect", str(path)]) == 0
    assert "block.conv1.weight" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_global_budget_spends_one_budget_and_keeps_the_folds(fmt):
    model, x = pruned("cnn")
    nnz = {k: int(m.sum()) for k, (_, m, _) in layer_masks(model).items()}
    per_layer = regroup_model(pruned("cnn")[0], block=16, format=fmt, method="metis",
                              example_inputs=(x,))
    plan = regroup_model(model, block=16, format=fmt, method="metis", budget_scope="global",
                         example_inputs=(x,))
    assert plan.options.budget_scope == "global"
    assert plan.sides == per_layer.sides and len(plan.folds) == len(per_layer.folds) > 0
    kept = {k: int(r.mask.sum()) for k, r in plan.layers.items()}
    assert all(r.metrics["budget_scope"] == "global" for r in plan.layers.values())
    assert sum(kept.values()) <= sum(nnz[k] for k in plan.layers)       # iso, model-wide
    # The area moved between layers, to where it retains more weight magnitude.
    assert kept != {k: int(r.mask.sum()) for k, r in per_layer.layers.items()}
    values = {k: v.abs() for k, (v, _, _) in layer_masks(pruned("cnn")[0]).items()}

    def mass(p):
        return sum(float((values[k] * torch.from_numpy(r.mask)).sum())
                   for k, r in p.layers.items())
    assert mass(plan) > mass(per_layer)
    for name, side in plan.sides.items():       # folded orders are those of the folds
        r, p = plan.layers[name], per_layer.layers[name]
        if side["rows"] == "fold":
            assert np.array_equal(r.row_perm, p.row_perm)
        if side["cols"] == "fold":
            assert np.array_equal(r.col_perm, p.col_perm)
    ref, _ = _masked_reference("cnn", plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)
    to_block_sparse(model, plan, backend="bsr")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=ATOL)


def test_a_model_that_is_itself_the_layer_stays_dense_and_says_so():
    # to_block_sparse swaps submodules: the model object itself cannot be replaced, so it
    # stays a masked nn.Linear and the report says why (it once claimed BlockSparseLinear).
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.2)
    result = regroup.regroup_pattern(regroup.from_array(lin.weight.detach().numpy(),
                                                        name="weight"), block=16)
    plan = Plan.from_result({"weight": result})
    plan.apply(lin)
    x = torch.randn(3, 64)
    want = lin(x)
    report = to_block_sparse(lin, plan)
    assert type(lin) is nn.Linear
    assert report == {"weight": "stays dense-masked: the model itself is the layer "
                                "(to_block_sparse replaces submodules: wrap it, e.g. "
                                "nn.Sequential(layer))"}
    torch.testing.assert_close(lin(x), want)
