import numpy as np
import pytest

from regroup import RegroupError, from_array, regroup_pattern

torch = pytest.importorskip("torch")


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 16, 3))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    res = {}
    for name in ("0.weight", "2.weight"):
        w = sd[name] * (rng.random(sd[name].shape) < 0.2)
        res[name] = regroup_pattern(from_array(w, name=name), block=8, method="metis")
    return model, res


def test_apply_result_masks_exactly_the_kept_blocks():
    from regroup.adapters.torch import apply_result
    model, res = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_result(model, res) == ["0.weight", "2.weight"]
    for name, mod in (("0.weight", model[0]), ("2.weight", model[2])):
        mask = torch.from_numpy(res[name].mask)
        assert torch.equal(mod.weight_mask.bool(), mask)
        assert torch.equal(mod.weight, before[name] * mask)
    x = torch.randn(2, 32)
    ref = torch.nn.functional.linear(x, before["0.weight"] * torch.from_numpy(res["0.weight"].mask),
                                     before["0.bias"])
    torch.testing.assert_close(model[0](x), ref, rtol=0, atol=0)


def test_rewind_values_fill_the_refilled_positions():
    from regroup.adapters.torch import apply_result
    model, res = _setup()
    rewind = {"0.weight": torch.full((48, 32), 0.5)}
    apply_result(model, res, rewind=rewind)
    assert torch.equal(model[0].weight, 0.5 * torch.from_numpy(res["0.weight"].mask).float())


def test_mismatch_changes_nothing():
    from regroup.adapters.torch import apply_result
    model, res = _setup()
    res["9.weight"] = res["0.weight"]
    with pytest.raises(RegroupError, match="'9.weight' has no matching tensor"):
        apply_result(model, res)
    assert not hasattr(model[0], "weight_mask")
