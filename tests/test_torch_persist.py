"""Block-sparse models saved (state dict, .safetensors) and loaded into a fresh dense model
without their plan: exact against the model that was saved, hostile files refused.

Real networks: MobileNetV2 (ImageNet weights; fold and runtime plans), MiniLM's encoder as
nn.TransformerEncoder (block-sparse MultiheadAttention), Hugging Face BertModel (MiniLM).
One round trip per real model runs in a fresh Python process."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from regroup import FormatError, RegroupError  # noqa: E402
from regroup.adapters.torch import (BlockSparseConv2d, BlockSparseLinear,  # noqa: E402
                                    BlockSparseMultiheadAttention, Plan, fold_marker,
                                    load_block_sparse, regroup_model, save_block_sparse,
                                    to_block_sparse)
from regroup.adapters.torch.sparse import LAYOUT_KEYS, stored_result  # noqa: E402
from regroup.io import read_safetensors, write_safetensors  # noqa: E402
from regroup.io.safetensors import safetensors_metadata  # noqa: E402

from tests.torch_zoo import prune_encoder, pruned  # noqa: E402
from tests.torch_zoo import zoo as small_zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

RTOL = 1e-5            # relative to the largest output, fp32
METHOD = "sort"


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} x {scale:.3g}"


def _run(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


def _converted(name: str, mode: str = "runtime", fmt: str = "grid", backend: str = "bsr"):
    """A zoo model regrouped and made block-sparse, its input, output and plan."""
    model, x = pruned(name)
    plan = regroup_model(model, block=8, format=fmt, mode=mode, example_inputs=(x,),
                         method=METHOD)
    done = to_block_sparse(model, plan, backend=backend)
    return model, x, _run(model, x), plan, done


def _fresh(name: str) -> nn.Module:
    torch.manual_seed(123)                       # other values than the saved model's
    return small_zoo()[name][0]().eval()


# -- the state dict ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_the_state_dict_holds_each_layout(fmt):
    model, _, _, plan, _ = _converted("mlp", fmt=fmt)
    sd = model.state_dict()
    for layer in plan.layers:
        owner = layer.removesuffix(".weight")
        part = {k: sd[f"{owner}.core.{k}"] for k in (*LAYOUT_KEYS, "values")}
        assert all(part[k].dtype == torch.int64 and part[k].dim() == 1 for k in LAYOUT_KEYS)
        r, core = plan.current_result(layer), model.get_submodule(owner).core
        assert part["layout"].tolist() == [1, ("grid", "shuffled").index(fmt), 8, 8,
                                           *r.mask2d.shape]
        back = stored_result(layer, part, r.mask2d.shape)
        assert np.array_equal(back.mask, r.mask2d) and np.array_equal(back.row_perm,
                                                                      r.row_perm)
        if fmt == "grid":
            assert np.array_equal(back.col_perm, r.col_perm)
        else:
            assert [c.tolist() for c in back.panel_cols] == [c.tolist() for c in r.panel_cols]
        assert part["values"].shape[0] == core.n_blocks == r.metrics["kept_blocks"]
        # The derived indices stay out of the state dict.
        for derived in ("crow", "col", "crow_t", "col_t", "perm_t", "in_index", "out_index"):
            assert f"{owner}.core.{derived}" not in sd


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("mode", ["runtime", "fold"])
def test_a_state_dict_rebuilds_the_model_in_a_fresh_dense_one(name, mode):
    model, x, want, plan, done = _converted(name, mode)
    fresh = _fresh(name)
    got_done = load_block_sparse(fresh, model.state_dict(), backend="bsr")
    assert got_done == done
    for layer in plan.layers:
        mod = fresh.get_submodule(layer.removesuffix(".weight"))
        assert isinstance(mod, (BlockSparseLinear, BlockSparseConv2d))
        assert mod.core.backend == "bsr"
    assert fold_marker(fresh) == fold_marker(model) and (fold_marker(fresh) != 0) == \
        (mode == "fold")
    torch.testing.assert_close(_run(fresh, x), want, rtol=0, atol=0)
    if mode == "fold":                          # the marker still refuses a second fold
        with pytest.raises(RegroupError, match="already permuted by a folding regroup plan"):
            plan.apply(fresh)


def test_shuffled_layouts_and_safetensors_round_trip(tmp_path):
    model, x, want, _, _ = _converted("cnn", fmt="shuffled")
    path = tmp_path / "cnn.safetensors"
    save_block_sparse(model, path, metadata={"note": "shuffled"})
    meta = safetensors_metadata(path)
    assert meta["format"] == "regroup.block_sparse" and meta["note"] == "shuffled"
    layers = json.loads(meta["layers"])
    assert layers["stem"] == {"layer": "stem.weight", "format": "shuffled", "block": [8, 8],
                              "shape": [32, 27], "blocks": model.stem.core.n_blocks}
    fresh = _fresh("cnn")
    load_block_sparse(fresh, path, backend="dense")
    torch.testing.assert_close(_run(fresh, x), want, rtol=RTOL, atol=RTOL)


def test_the_file_is_standard_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, *_ = _converted("transformer")
    save_block_sparse(model, tmp_path / "m.safetensors")
    theirs = st.load_file(str(tmp_path / "m.safetensors"))
    sd = model.state_dict()
    assert set(theirs) == set(sd)
    for k, v in sd.items():
        assert torch.equal(theirs[k], v), k


def test_a_pruned_fresh_model_and_a_torch_save_file_load_too(tmp_path):
    model, x, want, _, _ = _converted("cnn", "fold")
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    fresh, _ = pruned("cnn", seed=7)             # pruned its own way: masks are replaced
    load_block_sparse(fresh, tmp_path / "cnn.pt", backend="bsr")
    torch.testing.assert_close(_run(fresh, x), want, rtol=0, atol=0)


def test_dense_masked_layers_get_their_prune_masks_back():
    """A plan that leaves layers dense-masked (prune's weight_orig / weight_mask): a fresh
    unpruned model gets the masks registered before loading."""
    model, x = pruned("mlp")
    plan = regroup_model(model, block=8, mode="runtime", method=METHOD,
                         layers="layers.0.weight")
    to_block_sparse(model, plan, backend="bsr")
    want = _run(model, x)
    fresh = _fresh("mlp")
    load_block_sparse(fresh, model.state_dict())
    assert isinstance(fresh.layers[0], BlockSparseLinear)
    assert torch.equal(fresh.head.weight_mask, model.head.weight_mask)
    assert type(fresh.head) is nn.Linear
    _close(_run(fresh, x), want, "dense-masked layers")


def test_a_converted_model_refuses_another_layout():
    model, *_ = _converted("mlp")
    other, *_ = _converted("mlp", fmt="shuffled")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RegroupError, match="layer 'layers.0.weight': the state dict's block "
                                           "layout .* differs from this module's"):
        model.load_state_dict(other.state_dict())
    model.load_state_dict(before)                # the same layout: a plain load works
    with pytest.raises(RegroupError, match="'head' is already block-sparse in the model"):
        load_block_sparse(model, other.state_dict())


def test_strict_refuses_keys_the_model_lacks():
    model, x, want, _, _ = _converted("mlp")
    sd = {**model.state_dict(), "extra.weight": torch.zeros(3)}
    fresh = _fresh("mlp")
    with pytest.raises(RegroupError, match=r"strict=True\): missing \[\], unexpected "
                                           r"\['extra.weight'\]"):
        load_block_sparse(fresh, sd)
    assert type(fresh.layers[0]) is nn.Linear    # nothing changed
    load_block_sparse(fresh, sd, strict=False)           # backend auto: dense or bsr
    _close(_run(fresh, x), want, "strict=False")


# -- hostile input ---------------------------------------------------------------------
def _grid_sd():
    model, *_ = _converted("mlp")
    return model.state_dict()


def _shuffled_sd():
    model, *_ = _converted("mlp", fmt="shuffled")
    return model.state_dict()


def _set(sd, key, fn):
    sd = dict(sd)
    sd[key] = fn(sd[key].clone())
    return sd


P = "layers.0.core."


def _fill(i: int, value) -> callable:
    """Set entry ``i`` of a tensor to ``value`` (a callable of the tensor: computed)."""
    def tamper(t):
        t[i] = value(t) if callable(value) else value
        return t
    return tamper


# case -> (state dict, key, tampering, what the error says)
HOSTILE = {
    "block row out of range": (_grid_sd, P + "block_row", _fill(0, 10**6),
                               "layer 'layers.0.weight': 'block_row' holds block rows "
                               "outside"),
    "block col negative": (_grid_sd, P + "block_col", _fill(0, -1),
                           "'block_col' holds block columns outside"),
    "gather out of range": (_grid_sd, P + "col_gather", _fill(3, 999),
                            r"'col_gather'\[:cols\] is not a permutation of range\(40\)"),
    "row_perm repeated": (_grid_sd, P + "row_perm", _fill(1, lambda t: int(t[0])),
                          r"'row_perm' is not a permutation of range\(96\)"),
    "row_perm short": (_grid_sd, P + "row_perm", lambda t: t[:-1],
                       r"'row_perm' is not a permutation of range\(96\)"),
    "values shape": (_grid_sd, P + "values", lambda t: t[:, :, :4],
                     r"'values' must be floating point of shape \(\d+, 8, 8\)"),
    "values count": (_grid_sd, P + "values", lambda t: t[1:],
                     "'values' must be floating point of shape"),
    "integer values": (_grid_sd, P + "values", lambda t: t.long(),
                       "'values' must be floating point"),
    "float indices": (_grid_sd, P + "row_perm", lambda t: t.double(),
                      "'row_perm' must be a 1-D integer tensor, got torch.float64"),
    "other weight shape": (_grid_sd, P + "layout", _fill(4, 95),
                           "the stored layout is for a 95x40 weight, the model's is 96x40"),
    "huge block": (_grid_sd, P + "layout", _fill(2, 10**9),
                   "block 1000000000x8 does not fit the 96x40 weight"),
    "version": (_grid_sd, P + "layout", _fill(0, 7), "layout version 7"),
    "format code": (_grid_sd, P + "layout", _fill(1, 5), "format code 5"),
    "bias shape": (_grid_sd, "layers.0.bias", lambda t: t[:-1],
                   r"'layers.0.bias' has shape \(95,\), the model's \(96,\)"),
    "tile padded first": (_shuffled_sd, P + "col_gather", _fill(0, 40),
                          "a tile is empty, padded before its columns"),
    "tile column twice": (_shuffled_sd, P + "col_gather", _fill(1, lambda t: int(t[0])),
                          "panel 0 lists a column twice"),
    "tiles out of order": (_shuffled_sd, P + "block_row", lambda t: t.flip(0),
                           "the tiles are not in panel order"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_state_dicts_are_refused_naming_the_layer(case):
    make, key, tamper, match = HOSTILE[case]
    sd = _set(make(), key, tamper)
    fresh = _fresh("mlp")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RegroupError, match=match):
        load_block_sparse(fresh, sd)
    # Nothing changed.
    assert all(type(m) is nn.Linear for m in (*fresh.layers, fresh.head))
    after = fresh.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in
                                             before.items())


def test_repeated_blocks_and_missing_keys_are_refused():
    sd = _grid_sd()
    rows, cols = sd[P + "block_row"].clone(), sd[P + "block_col"].clone()
    rows[1], cols[1] = rows[0], cols[0]
    with pytest.raises(RegroupError, match="repeated or not in row-major order"):
        load_block_sparse(_fresh("mlp"), {**sd, P + "block_row": rows, P + "block_col": cols})
    sd.pop(P + "col_gather")
    with pytest.raises(RegroupError, match=r"lacks \['col_gather'\]"):
        load_block_sparse(_fresh("mlp"), sd)


def test_other_integer_index_dtypes_load_and_non_tensors_are_refused():
    model, x, want, _, _ = _converted("mlp")
    sd = {k: v.int() if k.startswith(P) and not k.endswith("values") else v
          for k, v in model.state_dict().items()}
    fresh = _fresh("mlp")
    load_block_sparse(fresh, sd, backend="bsr")
    assert fresh.layers[0].core.row_perm.dtype == torch.int64
    torch.testing.assert_close(_run(fresh, x), want, rtol=0, atol=0)
    with pytest.raises(RegroupError, match=r"not tensors named by strings: \['head.bias'\]"):
        load_block_sparse(_fresh("mlp"), {**model.state_dict(), "head.bias": [0.0] * 10})


def test_a_layout_on_the_wrong_module_is_refused():
    sd = _grid_sd()
    moved = {k.replace("layers.0.", "norm.") if k.startswith(P) else k: v
             for k, v in sd.items()}
    with pytest.raises(RegroupError, match="'norm' is stored block-sparse, but the model has "
                                           "BatchNorm1d there"):
        load_block_sparse(_fresh("mlp"), moved)


def test_hostile_safetensors_files_are_refused(tmp_path):
    model, *_ = _converted("mlp")
    path = tmp_path / "m.safetensors"
    save_block_sparse(model, path)
    arrays, meta = read_safetensors(path), safetensors_metadata(path)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    # An index out of range, written as a well-formed file.
    bad = dict(arrays)
    bad[P + "block_row"] = bad[P + "block_row"].copy()
    bad[P + "block_row"][-1] = 99
    write_safetensors(bad, tmp_path / "bad.safetensors", meta)
    with pytest.raises(RegroupError, match="layer 'layers.0.weight': 'block_row' holds"):
        load_block_sparse(_fresh("mlp"), tmp_path / "bad.safetensors")
    # A header that disagrees with the tensors.
    layers = json.loads(meta["layers"])
    layers["layers.0"]["blocks"] += 1
    write_safetensors(arrays, tmp_path / "hdr.safetensors", {**meta, "layers": json.dumps(layers)})
    with pytest.raises(RegroupError, match="the header describes layer 'layers.0'"):
        load_block_sparse(_fresh("mlp"), tmp_path / "hdr.safetensors")
    del layers["layers.0"]
    write_safetensors(arrays, tmp_path / "hdr2.safetensors", {**meta, "layers": json.dumps(layers)})
    with pytest.raises(RegroupError, match="the header lists block-sparse layers"):
        load_block_sparse(_fresh("mlp"), tmp_path / "hdr2.safetensors")
    # A truncated file.
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="inconsistent with the file"):
        load_block_sparse(_fresh("mlp"), tmp_path / "cut.safetensors")


# -- real networks -----------------------------------------------------------------------
_CHILD = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("zoo", sys.argv[1])
zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo)
from regroup.adapters.torch import fold_marker, load_block_sparse
kind, path, x_path, out_path = sys.argv[2:6]
model = (zoo.mobilenet_v2(pretrained=False) if kind == "mobilenet" else
         zoo.minilm_torch_encoder(2))
done = load_block_sparse(model, path, backend="bsr")
x = torch.load(x_path, weights_only=True)
with torch.no_grad():
    y = model(x)
torch.save(y, out_path)
print(json.dumps({"done": done, "marker": fold_marker(model),
                  "modules": sorted({type(m).__name__ for m in model.modules()})}))
"""


def _in_fresh_process(kind: str, path: Path, x: torch.Tensor, tmp_path: Path):
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "benchmarks" / "zoo.py"),
                           kind, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (torch.load(tmp_path / "y.pt", weights_only=True),
            json.loads(proc.stdout.strip().splitlines()[-1]))


def _mobilenet(real_mobilenet) -> nn.Module:
    model = real_mobilenet()
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)
    return model


@pytest.mark.parametrize("mode", ["fold", "runtime"])
def test_mobilenet_loads_without_its_plan(real_mobilenet, zoo, mode, tmp_path):
    x = zoo.photo_crops(2, size=96)
    model = _mobilenet(real_mobilenet)
    plan = regroup_model(model, mode=mode, block=16, method=METHOD, example_inputs=(x,))
    done = to_block_sparse(model, plan, backend="bsr")
    want = _run(model, x)
    assert (fold_marker(model) != 0) == (mode == "fold") and (mode == "runtime" or plan.folds)
    if mode == "fold":
        path = tmp_path / "mobilenet.safetensors"
        save_block_sparse(model, path)
        got, info = _in_fresh_process("mobilenet", path, x, tmp_path)
        assert info["done"] == done and info["marker"] == fold_marker(model)
        assert "BlockSparseConv2d" in info["modules"] and "Plan" not in info["modules"]
    else:
        fresh = zoo.mobilenet_v2(pretrained=False)
        assert load_block_sparse(fresh, model.state_dict(), backend="bsr") == done
        # The depthwise convolutions stay pruned nn.Conv2d, their masks loaded.
        dw = fresh.features[2].conv[1][0]
        assert type(dw) is nn.Conv2d and torch.equal(
            dw.weight_mask, model.features[2].conv[1][0].weight_mask)
        got = _run(fresh, x)
    _close(got, want, f"MobileNetV2 ({mode} plan) reloaded")


def _encoder(zoo) -> nn.Module:
    try:
        model = zoo.minilm_torch_encoder(2)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    return prune_encoder(model)


@pytest.mark.parametrize("mode, layers", [("runtime", None), ("fold", None),
                                          ("runtime", ["*.out_proj.weight", "*linear2*"])])
def test_minilm_encoder_with_block_sparse_attention_loads_without_its_plan(
        zoo, mode, layers, tmp_path):
    x = torch.randn(2, 9, 384, generator=torch.Generator().manual_seed(0))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    model = _encoder(zoo)
    with warnings.catch_warnings():     # fold: torch.fx cannot trace it whole (a warning)
        warnings.simplefilter("ignore")
        plan = regroup_model(model, mode=mode, block=16, method=METHOD, example_inputs=(x,),
                             **({} if layers is None else {"layers": layers}))
    done = to_block_sparse(model, plan, backend="bsr")
    assert "BlockSparseMultiheadAttention" in done.values()
    want, want_kpm = _run(model, x), _run(model, x, src_key_padding_mask=kpm)
    path = tmp_path / "encoder.safetensors"
    save_block_sparse(model, path)
    if mode == "runtime" and layers is None:
        got, info = _in_fresh_process("encoder", path, x, tmp_path)
        assert info["done"] == done
        assert "BlockSparseMultiheadAttention" in info["modules"]
        _close(got, want, "MiniLM encoder in a fresh process")
    fresh = _encoder(zoo) if layers else zoo.minilm_torch_encoder(2)
    assert load_block_sparse(fresh, path, backend="bsr") == done
    attn = fresh.layers[0].self_attn
    assert isinstance(attn, BlockSparseMultiheadAttention)
    if layers:          # in_proj stays dense, its prune mask carried over
        assert type(attn.in_proj) is nn.Linear and hasattr(attn.in_proj, "weight_mask")
    _close(_run(fresh, x), want, f"MiniLM encoder ({mode}, {layers})")
    _close(_run(fresh, x, src_key_padding_mask=kpm), want_kpm, "with key_padding_mask")


def test_bert_loads_without_its_plan(real_minilm):
    model, tokenizer = real_minilm(2)
    ids = tokenizer(["The quick brown fox jumps over the lazy dog.",
                     "Block-sparse weights travel with their layout."], padding=True,
                    return_tensors="pt")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", 0.8)
    plan = regroup_model(model, mode="runtime", block=16, method=METHOD)
    done = to_block_sparse(model, plan, backend="bsr")
    want = _run(model, **ids).last_hidden_state
    fresh, _ = real_minilm(2)
    assert load_block_sparse(fresh, model.state_dict(), backend="bsr") == done
    assert isinstance(fresh.encoder.layer[1].attention.self.query, BlockSparseLinear)
    _close(_run(fresh, **ids).last_hidden_state, want, "BertModel")
    # The plan is not needed, but still agrees: re-applying it to the loaded model is refused.
    assert isinstance(plan, Plan)
    with pytest.raises(RegroupError, match="already a BlockSparseLinear"):
        to_block_sparse(copy.deepcopy(fresh), plan)
