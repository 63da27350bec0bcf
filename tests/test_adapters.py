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


def _pruned_linear_and_block_result():
    """A Linear pruned by l1_unstructured, and a block layout of its mask that re-enables
    some pruned positions."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    prune.l1_unstructured(model[0], "weight", amount=0.8)
    before = model[0].weight_mask.bool().clone()
    w = model[0].weight_orig.detach().numpy() * before.numpy()
    r = regroup_pattern(from_array(w, name="0.weight", mask=before.numpy()), block=16,
                        method="metis")
    block = torch.from_numpy(r.mask)
    assert bool((block & ~before).any())            # the layout refills pruned positions
    return model, before, r, block


def test_apply_result_on_a_pruned_module_replaces_its_mask():
    """Not a second custom_from_mask (a PruningContainer multiplying the masks, which
    would leave the refilled positions at zero): the block mask itself."""
    from regroup.adapters.torch import apply_result
    from torch.nn.utils import prune
    model, before, r, block = _pruned_linear_and_block_result()
    lin = model[0]
    orig = lin.weight_orig.detach().clone()
    assert apply_result(model, {"0.weight": r}) == ["0.weight"]
    assert torch.equal(lin.weight_mask.bool(), block)
    assert torch.equal(lin.weight_orig, orig)
    for _ in range(2):                              # as set, and as the hook recomputes it
        assert torch.equal(lin.weight, orig * block)
        assert torch.equal(lin.weight != 0, block & (orig != 0))
        refilled = block & ~before
        assert torch.equal(lin.weight[refilled], orig[refilled])
        assert bool((lin.weight[refilled] != 0).all())
        lin(torch.randn(3, 64))
    assert not any(isinstance(h, prune.PruningContainer)
                   for h in lin._forward_pre_hooks.values())
    # Gradients reach weight_orig through the mask, as with torch's own pruning.
    lin(torch.randn(3, 64)).sum().backward()
    assert bool((lin.weight_orig.grad[~block] == 0).all())
    assert bool((lin.weight_orig.grad[refilled] != 0).all())
    prune.remove(lin, "weight")
    assert torch.equal(lin.weight.detach(), orig * block)


def test_apply_result_on_an_ao_parametrized_module_replaces_its_mask():
    from regroup.adapters.torch import apply_result
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4),
                                      zeros_per_block=4)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    lin = model[0]
    mask = lin.parametrizations.weight[0].mask
    before = mask.bool().clone()
    orig = lin.parametrizations.weight.original.detach().clone()
    r = regroup_pattern(from_array(orig.numpy() * before.numpy(), name="0.weight",
                                   mask=before.numpy()), block=16, method="metis")
    block = torch.from_numpy(r.mask)
    refilled = block & ~before
    assert bool(refilled.any())
    apply_result(model, {"0.weight": r}, rewind={"0.weight": 2 * orig})
    assert mask is sparsifier.state["0.weight"]["mask"]      # updated in place
    assert torch.equal(mask.bool(), block)
    assert torch.equal(lin.parametrizations.weight.original, 2 * orig)
    assert torch.equal(lin.weight, 2 * orig * block)
    assert torch.equal(lin.weight[refilled], 2 * orig[refilled])
    assert not hasattr(lin, "weight_mask")


def test_write_mask_refuses_a_wrong_shape_and_changes_nothing():
    from regroup.adapters.torch import write_mask
    model, before, _, block = _pruned_linear_and_block_result()
    with pytest.raises(RegroupError, match=r"the mask of Linear.weight has shape \(48, 32\)"):
        write_mask(model[0], "weight", block[:, :32])
    with pytest.raises(RegroupError, match="the values for Linear.weight"):
        write_mask(model[0], "weight", block, values=torch.zeros(3))
    with pytest.raises(RegroupError, match="has no tensor 'kernel'"):
        write_mask(model[0], "kernel", block)
    assert torch.equal(model[0].weight_mask.bool(), before)
    # On a plain weight it prunes (torch.nn.utils.prune's convention).
    plain = torch.nn.Linear(64, 48)
    w = plain.weight.detach().clone()
    write_mask(plain, "weight", block.numpy())
    assert torch.equal(plain.weight_mask.bool(), block)
    assert torch.equal(plain.weight, w * block)


def test_apply_result_refuses_a_misshapen_rewind_and_changes_nothing():
    from regroup.adapters.torch import apply_result
    model, res = _setup()
    with pytest.raises(RegroupError, match="rewind value of '2.weight' has shape"):
        apply_result(model, res, rewind={"2.weight": torch.zeros(16, 4)})
    assert not hasattr(model[0], "weight_mask")
