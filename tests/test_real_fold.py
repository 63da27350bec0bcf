"""Folding on real pretrained models: through depthwise convolutions (MobileNetV2) and
inside models torch.fx cannot trace whole (Hugging Face BertModel, nn.TransformerEncoder).

Every folded model must compute what the same masked model computes unpermuted."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from regroup.adapters.torch import (Plan, hidden_dims, regroup_model,  # noqa: E402
                                    to_block_sparse)

TOL = 1e-5          # relative to the output's largest magnitude, fp32


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= TOL, f"relative error {err:.2e}"


def _fold_and_check(make, inputs, output, tmp_path, **options):
    """Regroup a fresh ``make()`` in fold mode and check it against an unpermuted copy with
    the same block masks, block-sparse, and re-applied from the saved plan."""
    model, ref = make(), make()
    plan = regroup_model(model, block=16, format="grid", mode="fold", example_inputs=inputs,
                         **{"method": "sort", **options})
    plan.apply(ref, permute=False)                 # the same masks, original order
    with torch.no_grad():
        want = output(ref(*inputs))
        got = output(model(*inputs))
    _close(got, want)
    path = tmp_path / "plan.regroup.npz"
    plan.save(path)
    fresh = make()
    Plan.load(path).apply(fresh)
    with torch.no_grad():
        _close(output(fresh(*inputs)), want)
    done = to_block_sparse(model, plan, backend="dense")
    assert any(v.startswith("BlockSparse") for v in done.values()), done
    with torch.no_grad():
        _close(output(model(*inputs)), want)
    for name, side in plan.sides.items():
        for s in ("rows", "cols"):
            if side[s] != "fold":
                why = side.get("why_" + s)
                assert isinstance(why, str) and why.strip(), (name, s, side)
    return plan


# -- MobileNetV2: expand -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project ------------
def _is_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def test_mobilenet_folds_through_depthwise_convolutions(real_mobilenet, zoo, tmp_path):
    def make():
        model = real_mobilenet()
        params = [(m, "weight") for m in model.modules()
                  if _is_1x1(m) or isinstance(m, nn.Linear)]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.85)
        # A pruned depthwise conv: its weight_orig and weight_mask must follow the fold.
        prune.l1_unstructured(model.features[2].conv[1][0], "weight", amount=0.5)
        return model

    x = zoo.photo_crops(2, size=96)
    plan = _fold_and_check(make, (x,), lambda y: y, tmp_path, refine=True)
    model = real_mobilenet()
    ones = [f"{n}.weight" for n, m in model.named_modules() if _is_1x1(m)]
    assert len(ones) == 34
    folded = sum(plan.sides[n][s] == "fold" for n in ones for s in ("rows", "cols"))
    assert folded >= 2 * 2 * len(ones) / 3, folded        # 66 of 68 when written
    # Every depthwise conv is carried by a fold (none is a dimension of size <= 16).
    depthwise = {n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    carried = {n for f in plan.folds for n in f.norms}
    assert depthwise - {"features.1.conv.0.0"} <= carried
    expand = plan.sides["features.2.conv.0.0.weight"]
    project = plan.sides["features.2.conv.2.weight"]
    assert expand["rows"] == "fold" and project["cols"] == "fold"
    # The folded orders were refined jointly (the outputs above are exact with them).
    assert any(n.startswith("folded orders refined jointly") for n in plan.notes), plan.notes


def test_other_grouped_convolutions_still_stop_a_dimension():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.b = nn.Conv2d(32, 32, 1)
            self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)          # grouped
            self.c = nn.Conv2d(32, 32, 1)
            self.mult = nn.Conv2d(32, 64, 3, padding=1, groups=32)      # multiplier 2
            self.d = nn.Conv2d(64, 8, 1)

        def forward(self, x):
            x = self.b(torch.relu(self.dw(torch.relu(self.a(x)))))
            return self.d(self.mult(self.c(self.g(x))))

    dims = hidden_dims(Net(), (torch.randn(1, 3, 8, 8),))
    by_layer = {n: (dims.dims[i], dims.dims[o]) for n, (i, o) in dims.layer_dims.items()}
    a_out = by_layer["a"][1]
    assert a_out.foldable and a_out.norms == ["dw"] and a_out.consumers == ["b"]
    assert by_layer["dw"][0] is by_layer["dw"][1] is a_out
    for name in ("g", "mult"):
        for d in by_layer[name]:
            assert any(f"grouped convolution {name!r}" in r for r in d.reasons)


# -- models torch.fx cannot trace whole ----------------------------------------------------
def _prune_linears(model: nn.Module, amount: float = 0.8) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


def test_bert_feed_forward_folds(real_minilm, tmp_path):
    _, tokenizer = real_minilm(1)
    ids = tokenizer(["The quick brown fox jumps over the lazy dog.",
                     "Permutations fold into the weights."], padding=True,
                    return_tensors="pt")["input_ids"]

    def make():
        return _prune_linears(real_minilm(2)[0])

    with pytest.warns(RuntimeWarning, match="could not trace BertModel"):
        plan = _fold_and_check(make, (ids,), lambda y: y.last_hidden_state, tmp_path)
    for i in range(2):
        layer = f"encoder.layer.{i}"
        assert plan.sides[f"{layer}.intermediate.dense.weight"]["rows"] == "fold"
        assert plan.sides[f"{layer}.output.dense.weight"]["cols"] == "fold"
        # The residual stream enters and leaves through untraceable code.
        why = plan.sides[f"{layer}.output.dense.weight"]["why_rows"]
        assert f"crosses the boundary of '{layer}.output'" in why
        assert "could not trace" in plan.sides[f"{layer}.attention.self.query.weight"][
            "why_rows"]
    assert len(plan.folds) == 2


def test_torch_transformer_encoder_feed_forward_folds(zoo, tmp_path):
    pytest.importorskip("safetensors")
    try:
        zoo.minilm_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    x = torch.randn(2, 9, 384, generator=torch.Generator().manual_seed(0))

    def make():
        return _prune_linears(zoo.minilm_torch_encoder(2))

    dims = hidden_dims(make(), (x,))
    assert not dims.traced and "layers.0.self_attn.out_proj" in dims.uncalled
    assert "TransformerEncoderLayer rule" in dims.parts["layers.0"]
    with pytest.warns(RuntimeWarning, match="could not trace TransformerEncoder"):
        plan = _fold_and_check(make, (x,), lambda y: y, tmp_path)
    for i in range(2):
        assert plan.sides[f"layers.{i}.linear1.weight"]["rows"] == "fold"
        assert plan.sides[f"layers.{i}.linear2.weight"]["cols"] == "fold"
    assert len(plan.folds) == 2


def test_untraceable_model_folds_inside_its_traceable_parts():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(24, 32)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.out = nn.Linear(32, 8)

        def forward(self, x):
            h = self.mlp(torch.relu(self.inp(x)))
            if h.sum() > 0:                 # data-dependent control flow: fx cannot trace
                h = -h
            return self.out(h)

    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(4, 24)
    dims = hidden_dims(model, (x,))
    assert not dims.traced and dims.parts == {"mlp": "traced"}
    sides = {n: (dims.dims[i], dims.dims[o]) for n, (i, o) in dims.layer_dims.items()}
    hidden = sides["mlp.0"][1]
    assert hidden.foldable and hidden.consumers == ["mlp.2"]
    assert any("crosses the boundary of 'mlp' (the model above it could not be traced"
               in r for r in sides["mlp.0"][0].reasons)
    assert any("crosses the boundary of 'mlp'" in r for r in sides["mlp.2"][1].reasons)
    assert any("the model could not be traced by torch.fx" in r
               for r in sides["inp"][1].reasons)
    # Folding the inner dimension keeps the function of the masked model.
    with torch.no_grad():
        for m in (model.mlp[0], model.mlp[2]):
            m.weight.mul_(torch.rand_like(m.weight) < 0.3)
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="could not trace Branchy"):
        plan = regroup_model(model, block=16, example_inputs=(x,), method="sort")
    assert plan.sides["mlp.0.weight"]["rows"] == "fold"
    assert plan.sides["mlp.2.weight"]["cols"] == "fold"
    assert not np.array_equal(plan.folds[0].perm, np.arange(64))
    plan.apply(ref, permute=False)
    with torch.no_grad():
        _close(model(x), ref(x))


def test_transformer_encoder_inside_a_traceable_model_folds_its_feed_forward():
    """torch.fx keeps nn.TransformerEncoder whole (a torch.nn module): its layers are
    analysed by parts all the same."""
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.enc(self.inp(x)))

    def make():
        torch.manual_seed(0)
        return _prune_linears(Tagger().eval(), 0.7)

    model, ref = make(), make()
    x = torch.randn(2, 5, 16)
    dims = hidden_dims(model, (x,))
    assert dims.traced and dims.parts["enc"].startswith("not traced")
    plan = regroup_model(model, block=16, example_inputs=(x,), method="sort")
    for i in range(2):
        assert plan.sides[f"enc.layers.{i}.linear1.weight"]["rows"] == "fold"
        assert plan.sides[f"enc.layers.{i}.linear2.weight"]["cols"] == "fold"
        why = plan.sides[f"enc.layers.{i}.linear2.weight"]["why_rows"]
        assert f"'enc.layers.{i}'" in why, why
    plan.apply(ref, permute=False)
    with torch.no_grad():
        _close(model(x), ref(x))


def test_a_part_whose_layer_is_also_called_from_outside_does_not_fold():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

        def forward(self, x):
            h = self.mlp(x)
            if h.sum() > 0:                 # data-dependent control flow: fx cannot trace
                h = h + 1
            return self.mlp[0](h)           # the part's first layer, called from outside

    dims = hidden_dims(Reuse().eval(), (torch.randn(4, 32),))
    hidden = dims.dims[dims.layer_dims["mlp.0"][1]]
    assert not hidden.foldable
    assert "'mlp.0' is also called from outside 'mlp'" in hidden.reasons


def test_a_transformer_encoder_layer_as_the_model():
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    dims = hidden_dims(layer, (torch.randn(2, 5, 32),))
    assert not dims.traced
    ffn = dims.dims[dims.layer_dims["linear1"][1]]
    assert ffn.foldable and ffn.consumers == ["linear2"]
    assert "out_proj" in next(iter(dims.uncalled))
