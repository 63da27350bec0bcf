"""Real pretrained networks through every conversion path, against the masked model.

- nn.TransformerEncoder with all-MiniLM-L6-v2's weights (2 layers), every Linear weight
  and every in_proj_weight pruned by l1_unstructured at 80 %: in_proj_weight is a layer,
  its attention becomes BlockSparseMultiheadAttention.
- MobileNetV2 with ImageNet weights, pruned by global L1 at 80 % (depthwise convolutions
  and the classifier included): the depthwise convolutions are skipped with the reason.

The reference is built from the unpruned network by multiplying each tensor by its final
mask (the plan's for regrouped layers, the pruning mask for the others): no pruning
hooks, no regroup code, so the encoder reference runs torch's fused fast path.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (BlockSparseConv2d, BlockSparseLinear,  # noqa: E402
                                    BlockSparseMultiheadAttention, Plan, layer_masks,
                                    regroup_model, to_block_sparse)

RTOL = 1e-5            # relative to the largest output, fp32
METHOD = "sort"        # cheap, non-trivial orders: the conversions are what is tested
BACKENDS = ("dense", "bsr", "auto")      # what BlockSparse* offer on the CPU


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} x {scale:.3g}"


def _masked_reference(base: nn.Module, pruned: nn.Module, plan: Plan) -> nn.Module:
    """``base`` with every pruned tensor multiplied by its final mask."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for key, mask in pruned.named_buffers():
            if not key.endswith("_mask"):
                continue
            name = key.removesuffix("_mask")
            if name in plan.layers:
                mask = torch.from_numpy(plan.layers[name].mask)
            ref.get_parameter(name).mul_(mask)
    return ref.eval()


def _run(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


# -- nn.TransformerEncoder with MiniLM's weights -----------------------------------------
@pytest.fixture(scope="module")
def encoder(zoo):
    try:
        base = zoo.minilm_torch_encoder(2)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    pruned = copy.deepcopy(base)
    with torch.no_grad():          # leaf tensors, so that the pruned model deep-copies
        for m in pruned.modules():
            if isinstance(m, nn.Linear):
                prune.l1_unstructured(m, "weight", 0.8)
            elif isinstance(m, nn.MultiheadAttention):
                prune.l1_unstructured(m, "in_proj_weight", 0.8)
    model = copy.deepcopy(pruned)
    plan = regroup_model(model, mode="runtime", block=16, method=METHOD)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 384, generator=g)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True                           # the second sequence has 6 tokens
    ref = _masked_reference(base, pruned, plan)
    return SimpleNamespace(pruned=pruned, model=model, plan=plan, x=x, kpm=kpm, ref=ref,
                           want=_run(ref, x), want_kpm=_run(ref, x, src_key_padding_mask=kpm))


def _check_encoder(model: nn.Module, enc, what: str) -> None:
    _assert_close(_run(model, enc.x), enc.want, what)
    got = _run(model, enc.x, src_key_padding_mask=enc.kpm)
    _assert_close(got, enc.want_kpm, what + " with key_padding_mask")


def test_encoder_plans_every_projection_including_in_proj(encoder):
    plan = encoder.plan
    for i in range(2):
        for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                  "linear2.weight"):
            assert f"layers.{i}.{w}" in plan.layers
        side = plan.sides[f"layers.{i}.self_attn.in_proj_weight"]
        assert (side["rows"], side["cols"]) == ("runtime", "runtime")
        assert plan.layers[f"layers.{i}.self_attn.in_proj_weight"].shape == (1152, 384)
    assert plan.skipped == {} and plan.dense == {}
    # The refilled mask is in the model, through prune's in_proj_weight_mask.
    attn = encoder.model.layers[0].self_attn
    assert torch.equal(attn.in_proj_weight_mask.bool(), torch.from_numpy(
        plan.layers["layers.0.self_attn.in_proj_weight"].mask))


def test_encoder_runtime_mode_and_apply_compute_the_masked_model(encoder):
    _check_encoder(encoder.model, encoder, "regroup_model(mode='runtime')")
    fresh = copy.deepcopy(encoder.pruned)
    encoder.plan.apply(fresh)
    _check_encoder(fresh, encoder, "plan.apply")


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_to_block_sparse_computes_the_masked_model(encoder, backend):
    model = copy.deepcopy(encoder.model)
    done = to_block_sparse(model, encoder.plan, backend=backend)
    assert set(done) == set(encoder.plan.layers)
    for name, what in done.items():
        want = ("BlockSparseMultiheadAttention" if ".self_attn." in name
                else "BlockSparseLinear")
        assert what == want, name
    for layer in model.layers:
        assert isinstance(layer.self_attn, BlockSparseMultiheadAttention)
        assert isinstance(layer.self_attn.in_proj, BlockSparseLinear)
        assert isinstance(layer.self_attn.out_proj, BlockSparseLinear)
    _check_encoder(model, encoder, f"to_block_sparse(backend={backend!r})")


def test_encoder_saved_plan_converts_a_fresh_copy(encoder, tmp_path):
    encoder.plan.save(tmp_path / "encoder.regroup.npz")
    plan = Plan.load(tmp_path / "encoder.regroup.npz")
    assert list(plan.layers) == list(encoder.plan.layers)
    fresh = copy.deepcopy(encoder.pruned)
    plan.apply(fresh)
    done = to_block_sparse(fresh, plan, backend="bsr")
    assert "layers.1.self_attn.in_proj_weight" in done
    _check_encoder(fresh, encoder, "Plan.load + to_block_sparse")


def test_attention_weights_match_the_masked_attention(encoder):
    """need_weights=True: the weights themselves, per head and averaged, as torch's."""
    model = copy.deepcopy(encoder.model)
    to_block_sparse(model, encoder.plan, backend="bsr")
    sparse, dense = model.layers[0].self_attn, encoder.ref.layers[0].self_attn
    x, kpm = encoder.x, encoder.kpm
    for average in (True, False):
        with torch.no_grad():
            got, got_w = sparse(x, x, x, key_padding_mask=kpm, average_attn_weights=average)
            want, want_w = dense(x, x, x, key_padding_mask=kpm, average_attn_weights=average)
        assert got_w.shape == want_w.shape == ((2, 9, 9) if average else (2, 12, 9, 9))
        _assert_close(got_w, want_w, f"attention weights (average={average})")
        _assert_close(got, want, "attention output")


# -- MobileNetV2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet(real_mobilenet):
    base = real_mobilenet()
    pruned = copy.deepcopy(base)
    params = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)
    model = copy.deepcopy(pruned)
    plan = regroup_model(model, mode="runtime", block=16, method=METHOD)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ref = _masked_reference(base, pruned, plan)
    return SimpleNamespace(pruned=pruned, model=model, plan=plan, x=x, want=_run(ref, x))


def test_mobilenet_skips_depthwise_convolutions_with_the_reason(mobilenet):
    plan = mobilenet.plan
    depthwise = {f"{n}.weight" for n, m in mobilenet.pruned.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(depthwise) == 17
    assert depthwise <= set(plan.skipped) and not depthwise & set(plan.layers)
    for name in depthwise:
        assert plan.skipped[name].startswith("depthwise convolution (groups=")
        assert f"skipped {name}: depthwise" in plan.report()
    # Every other convolution and the classifier are regrouped, the stem (32 x 3*3*3)
    # included: 27 columns hold a 16-wide block.
    others = {f"{n}.weight" for n, m in mobilenet.pruned.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and f"{n}.weight" not in depthwise}
    assert set(plan.layers) == others
    assert plan.layers["features.0.0.weight"].shape == (32, 3, 3, 3)


def test_mobilenet_stem_is_skipped_when_smaller_than_the_block(mobilenet):
    model = copy.deepcopy(mobilenet.pruned)
    plan = regroup_model(model, mode="runtime", block=32, method=METHOD,
                         layers=["features.0.0.weight", "features.18.0.weight"])
    assert plan.skipped == {"features.0.0.weight": "matrix 32x27 is smaller than the block "
                                                   "32x32"}
    assert list(plan.layers) == ["features.18.0.weight"]


def test_mobilenet_conversions_compute_the_masked_model(mobilenet):
    _assert_close(_run(mobilenet.model, mobilenet.x), mobilenet.want, "runtime mode")
    for backend in ("dense", "bsr"):
        model = copy.deepcopy(mobilenet.model)
        done = to_block_sparse(model, mobilenet.plan, backend=backend)
        assert done["features.0.0.weight"] == "BlockSparseConv2d"
        assert done["classifier.1.weight"] == "BlockSparseLinear"
        assert set(done.values()) == {"BlockSparseConv2d", "BlockSparseLinear"}
        assert isinstance(model.features[0][0], BlockSparseConv2d)
        # The skipped depthwise convolutions stay pruned nn.Conv2d modules.
        assert type(model.features[1].conv[0][0]) is nn.Conv2d
        _assert_close(_run(model, mobilenet.x), mobilenet.want,
                      f"to_block_sparse(backend={backend!r})")


# -- edges ---------------------------------------------------------------------------------
def test_embeddings_are_never_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) < 0.2)          # both pruned by zeroing
    assert set(layer_masks(model)) == {"1.weight"}
    with pytest.raises(RegroupError, match="no layer matches"):
        regroup_model(model, mode="runtime", block=8, layers="0.weight")


def test_attention_with_other_key_dims_stays_dense_with_the_reason():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x, memory):
            return self.fc(self.attn(x, memory, memory)[0])

    torch.manual_seed(0)
    model = Cross().eval()
    with torch.no_grad():
        for m in (model.attn.out_proj, model.fc):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    assert set(layer_masks(model)) == {"attn.out_proj.weight", "fc.weight"}
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    plan = regroup_model(model, mode="runtime", block=8, method=METHOD)
    assert "kdim=16, vdim=16 != embed_dim=32" in plan.dense["attn.out_proj.weight"]
    want = _run(model, x, memory)
    done = to_block_sparse(model, plan, backend="bsr")
    assert done["attn.out_proj.weight"].startswith("stays dense-masked: MultiheadAttention "
                                                   "with kdim=16")
    assert done["fc.weight"] == "BlockSparseLinear"
    assert type(model.attn) is nn.MultiheadAttention
    _assert_close(_run(model, x, memory), want, "kdim != embed_dim")


def test_a_plan_for_another_model_or_a_converted_one_changes_nothing(encoder):
    model = nn.Sequential(nn.Linear(384, 384))
    with pytest.raises(RegroupError, match="no Linear or Conv2d weight, nor "
                                           "MultiheadAttention in_proj_weight"):
        to_block_sparse(model, encoder.plan)
    assert type(model[0]) is nn.Linear
    model = copy.deepcopy(encoder.model)
    to_block_sparse(model, encoder.plan, backend="dense")
    with pytest.raises(RegroupError, match="'layers.0.self_attn.in_proj_weight' is already a "
                                           "BlockSparseMultiheadAttention"):
        to_block_sparse(model, encoder.plan)


def test_bundled_photographs_are_real_and_distinct(zoo, real_mobilenet):
    """real_models' evaluation crops: colour photographs from three wheels, each a different
    ImageNet subject to the dense MobileNetV2 (so top-1 agreement is not one label)."""
    photos = zoo.photos()
    assert {"china", "flower"} <= set(photos)          # scikit-learn's, always there
    for name, im in photos.items():
        assert im.dim() == 3 and im.shape[0] == 3 and min(im.shape[1:]) >= 256, name
        assert 0.0 <= float(im.min()) and float(im.max()) <= 1.0, name
        assert float(im.std()) > 0.05, name            # a photograph, not a flat image
    crops = zoo.photo_crops(2 * len(photos), size=112, seed=0)
    assert crops.shape == (2 * len(photos), 3, 112, 112) and torch.isfinite(crops).all()
    assert torch.equal(crops, zoo.photo_crops(2 * len(photos), size=112, seed=0))
    with torch.no_grad():
        labels = real_mobilenet()(crops).argmax(-1)
    # crop i shows photo i % len(photos): most photos get their own label
    per_photo = [set(labels[i::len(photos)].tolist()) for i in range(len(photos))]
    assert len(set.union(*per_photo)) >= min(len(photos), 6) - 1, per_photo
