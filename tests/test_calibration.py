"""Calibration: input norms per weight column, and regroup_model ranking blocks by them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from regroup import RegroupError
from regroup.adapters.torch import input_scales, regroup_model


def _norms(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt()


def test_linear_scales_are_the_norms_of_its_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(5, 3, 6) for _ in range(3)]
    got = input_scales(model, batches)
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    h = torch.relu(model[0](x))
    torch.testing.assert_close(got["0.weight"], _norms(x)[None], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["2.weight"], _norms(h.detach())[None], rtol=1e-6, atol=1e-6)
    assert set(got) == {"0.weight", "2.weight"}
    assert set(input_scales(model, batches, ["2.weight"])) == {"2.weight"}
    assert input_scales(model, batches, max_batches=1)["0.weight"].shape == (1, 6)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1),
                                dict(kernel_size=3, stride=2, padding=2, dilation=2),
                                dict(kernel_size=(3, 1), padding="same"),
                                dict(kernel_size=2, padding="valid"),
                                dict(kernel_size=3, padding=1, padding_mode="reflect"),
                                dict(kernel_size=1)])
def test_conv_scales_are_the_norms_of_the_im2col_columns(kw):
    """Column c*kh*kw + i*kw + j of the conv weight as a matrix multiplies im2col row
    (c, i, j): its norm over every output position and batch item."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, **kw)
    x = torch.randn(2, 3, 9, 8)
    got = input_scales(conv, [x])["weight"]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if conv.padding == "same":
        xp = F.pad(x, (0, 0, 1, 1), mode=mode)
    elif conv.padding == "valid":
        xp = x
    else:
        ph, pw = conv.padding
        xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    cols = F.unfold(xp.double(), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    want = cols.pow(2).sum(dim=(0, 2)).sqrt()
    assert got.shape == (1, conv.weight[0].numel())
    torch.testing.assert_close(got[0], want, rtol=1e-9, atol=1e-9)


def test_in_proj_rows_take_their_own_input():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8) * 3, torch.randn(2, 5, 8) * 7
    got = input_scales(mha, [(q, k, v)])["in_proj_weight"]
    assert got.shape == (24, 8)
    for seg, t in enumerate((q, k, v)):
        torch.testing.assert_close(got[seg * 8:(seg + 1) * 8],
                                   _norms(t)[None].expand(8, 8), rtol=1e-9, atol=1e-9)


def test_transformer_encoder_linears_are_observed_in_eval():
    """The encoder layer's inference fast path would skip its Linear modules."""
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    got = input_scales(enc, [torch.randn(2, 4, 16)])
    for i in range(2):
        assert {f"layers.{i}.linear1.weight", f"layers.{i}.linear2.weight",
                f"layers.{i}.self_attn.in_proj_weight"} <= set(got)
    assert not enc.training
    # out_proj's weight is read by the attention directly: never called, so absent.
    assert "layers.0.self_attn.out_proj.weight" not in got


def test_input_scales_refuses_bad_arguments():
    model = nn.Linear(4, 4)
    with pytest.raises(RegroupError, match="no batch"):
        input_scales(model, [])
    with pytest.raises(RegroupError, match="nope.weight"):
        input_scales(model, [torch.randn(2, 4)], ["nope.weight"])
    for bad, kind in [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(kind, match="'max_batches' parameter of input_scales must be an "
                                       "int >= 1 or None"):
            input_scales(model, [torch.randn(2, 4)], max_batches=bad)


def _planted():
    """A 32x32 layer whose first 16 input features are weak weights on loud inputs: by |w|
    the other half wins, by |w| x input norm this half."""
    torch.manual_seed(4)
    lin = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(32, 32) + 0.5)
        lin.weight[:, :16] *= 0.2
    prune.l1_unstructured(lin, "weight", amount=0.05)     # a pruned layer
    scale = torch.ones(32)
    scale[:16] = 50.0
    data = [torch.randn(64, 32) * scale]
    return nn.Sequential(lin), data


@pytest.mark.parametrize("method", ["identity", "auto"])
def test_calibration_ranks_blocks_by_what_they_carry(method):
    lin, data = _planted()
    plain = regroup_model(lin, block=16, method=method, budget="blocks=2", mode="runtime",
                          layers="0.weight", dense_above=1.0)
    kept = plain.layers["0.weight"].mask2d
    assert kept[:, 16:].all() and not kept[:, :16].any()
    lin, data = _planted()
    calibrated = regroup_model(lin, block=16, method=method, budget="blocks=2",
                               mode="runtime", layers="0.weight", dense_above=1.0,
                               calibration=data)
    kept = calibrated.layers["0.weight"].mask2d
    assert kept[:, :16].all() and not kept[:, 16:].any()
    assert any("calibration" in n for n in calibrated.notes)
    # Precomputed norms give the same plan as the batches.
    lin, data = _planted()
    again = regroup_model(lin, block=16, method=method, budget="blocks=2", mode="runtime",
                          layers="0.weight", dense_above=1.0,
                          calibration=input_scales(lin, data))
    np.testing.assert_array_equal(again.layers["0.weight"].mask2d, kept)


def test_calibration_argument_errors():
    lin, data = _planted()
    common = dict(block=16, mode="runtime", layers="0.weight", dense_above=1.0)
    with pytest.raises(TypeError, match="calibration"):
        regroup_model(lin, calibration=3, **common)
    with pytest.raises(TypeError, match="calibration"):
        regroup_model(lin, calibration="batches", **common)
    with pytest.raises(RegroupError, match="finite"):
        regroup_model(lin, calibration={"0.weight": torch.full((1, 32), float("nan"))},
                      **common)
    with pytest.raises(RegroupError, match="does not broadcast"):
        regroup_model(lin, calibration={"0.weight": torch.ones(1, 7)}, **common)
    # A layer the mapping does not cover is ranked by |w| and named in the notes.
    plan = regroup_model(lin, calibration={}, **common)
    assert any("did not observe 1 layers" in n for n in plan.notes)
