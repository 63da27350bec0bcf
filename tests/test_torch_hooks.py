"""regroup inside torch.nn.utils.prune and torch.ao.pruning flows, and the IMP loop."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from regroup import RegroupError, RegroupOptions, check_layout  # noqa: E402
from regroup.adapters.torch import (RegroupBlocks, RegroupSparsifier,  # noqa: E402
                                    block_layout, imp_regroup, magnitude_mask,
                                    regroup_unstructured)


def _layer(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 96)


def test_magnitude_mask_matches_l1_unstructured():
    lin = _layer()
    ref = copy.deepcopy(lin)
    prune.l1_unstructured(ref, "weight", amount=0.7)
    got = magnitude_mask(lin.weight, torch.ones_like(lin.weight), 0.7)
    assert torch.equal(got, ref.weight_mask.bool())


def test_prune_method_used_like_l1_unstructured():
    lin = _layer()
    orig = lin.weight.detach().clone()
    regroup_unstructured(lin, "weight", amount=0.8, block=16, method="metis")
    r = block_layout(lin, "weight")
    mask = lin.weight_mask.bool().numpy()
    assert np.array_equal(mask, r.mask)
    check_layout(mask, "grid", (16, 16), r.row_perm, r.col_perm)
    assert mask.sum() <= int(round(0.2 * mask.size))            # iso budget
    # Refilled positions carry the unpruned values; prune.remove bakes them in.
    assert torch.equal(lin.weight, orig * lin.weight_mask)
    prune.remove(lin, "weight")
    assert torch.equal(lin.weight.detach(), orig * torch.from_numpy(mask))


def test_prune_method_refills_inside_a_pruning_container():
    lin = _layer()
    prune.l1_unstructured(lin, "weight", amount=0.85)
    before = lin.weight_mask.bool().clone()
    regroup_unstructured(lin, "weight", block=16, method="metis", format="shuffled")
    after = lin.weight_mask.bool()
    r = block_layout(lin)
    assert np.array_equal(after.numpy(), r.mask)
    # The block mask re-enables pruned positions (a plain container could only remove).
    assert bool((after & ~before).any())
    assert r.metrics["retained"] > r.metrics["retained_identity"]
    with pytest.raises(RegroupError, match="was not pruned with regroup_unstructured"):
        block_layout(nn.Linear(4, 4))


def test_ao_sparsifier_step_regroups_every_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsifier = RegroupSparsifier(sparsity_level=0.85, block=16, method="metis")
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"},
                                      {"tensor_fqn": "2.weight", "format": "shuffled"}])
    sparsifier.step()
    for fqn, fmt in (("0.weight", "grid"), ("2.weight", "shuffled")):
        r = sparsifier.results[fqn]
        mask = sparsifier.state[fqn]["mask"]
        assert r.format == fmt
        assert np.array_equal(mask.bool().numpy(), r.mask)
        assert mask.sum() <= round(0.15 * mask.numel())
    sparsifier.squash_mask()
    assert np.array_equal((model[0].weight != 0).numpy(), sparsifier.results["0.weight"].mask)


def _digits_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()
    return x, y


def test_imp_regroup_loop_prunes_regroups_rewinds_and_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    init = copy.deepcopy(model.state_dict())
    x, y = _digits_like()

    def train(m, r):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    def accuracy(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    events = []
    hist = imp_regroup(model, train, rounds=3, sparsity=0.9, block=16, method="metis",
                       evaluate=accuracy, callbacks=[lambda e, info: events.append(e)])
    assert [h["round"] for h in hist] == [0, 1, 2, 3]
    assert hist[0]["sparsity"] == 0 and hist[0]["plan"] is None
    assert hist[-1]["sparsity"] >= 0.88                      # iso: block area <= nnz
    assert all(0 <= h["score"] <= 1 for h in hist)
    assert events.count("regrouped") == 3 and events.count("rewound") == 3
    plan = hist[-1]["plan"]
    assert set(plan.layers) == {"0.weight", "2.weight"}       # the classifier is not pruned
    for name, r in plan.layers.items():
        mod = model[int(name[0])]
        assert np.array_equal(mod.weight_mask.bool().numpy(), r.mask)
    # Rewound to init before the final training, whose gradients are zero where the mask
    # is: pruned positions still hold their init values.
    dead = ~model[0].weight_mask.bool()
    assert torch.equal(model[0].weight_orig[dead], init["0.weight"][dead])


def test_imp_without_regroup_is_plain_imp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    hist = imp_regroup(model, lambda m, r: None, rounds=2, sparsity=0.75, regroup=False,
                       final_train=False)
    assert [h["plan"] for h in hist] == [None, None]
    # Only 0 is pruned (the classifier is left dense), to 1 - 0.75 density after 2 rounds.
    assert model[0].weight_mask.mean().item() == pytest.approx(0.25, abs=0.01)
    assert not hasattr(model[2], "weight_mask")
    with pytest.raises(ValueError, match="'scope' parameter of imp_regroup"):
        imp_regroup(model, lambda m, r: None, rounds=1, sparsity=0.5, scope="model")


def test_imp_rewind_state_must_belong_to_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    bad = {"encoder.0.weight": torch.zeros(64, 32)}
    with pytest.raises(RegroupError, match="rewind state has tensors the model lacks: "
                                           "encoder.0.weight"):
        imp_regroup(model, lambda m, r: None, rounds=1, sparsity=0.5, regroup=False,
                    rewind=bad, final_train=False)


def test_prune_method_takes_options_and_validates_at_the_call():
    lin = _layer()
    regroup_unstructured(lin, "weight", amount=0.8,
                         options=RegroupOptions(block=32, method="metis"), block=16)
    ref = _layer()
    regroup_unstructured(ref, "weight", amount=0.8, block=16, method="metis")
    assert block_layout(lin).block_shape == (16, 16)
    assert torch.equal(lin.weight_mask, ref.weight_mask)
    fresh = _layer()
    for kwargs, kind, match in [
            ({"block": "4y4"}, ValueError, "'block' parameter of regroup_unstructured"),
            ({"amount": 1.5}, ValueError, "'amount' parameter of regroup_unstructured"),
            ({"amount": "half"}, TypeError, "'amount' parameter of regroup_unstructured"),
            ({"budget_scope": "global"}, ValueError,
             "'budget_scope' parameter of regroup_unstructured must be 'layer'"),
            ({"layers": "fc.*"}, ValueError, "'layers' parameter of regroup_unstructured"),
            ({"blocks": 16}, TypeError, "regroup_unstructured got unexpected keyword")]:
        with pytest.raises(kind, match=match):
            regroup_unstructured(fresh, "weight", **kwargs)
    assert not hasattr(fresh, "weight_mask")
    with pytest.raises(ValueError, match="'method' parameter of RegroupBlocks"):
        RegroupBlocks(0.5, method="nope")


def test_sparsifier_config_overrides_are_validated_by_prepare():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsifier = RegroupSparsifier(sparsity_level=0.85, block=16, method="metis")
    with pytest.raises(ValueError, match=r"'format' parameter of RegroupSparsifier.prepare "
                                         r"\(config of '2.weight'\)"):
        sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"},
                                          {"tensor_fqn": "2.weight", "format": "csr"}])
    with pytest.raises(TypeError, match="unexpected keyword argument.*'blok'"):
        sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight", "blok": 8}])
    with pytest.raises(ValueError, match="'sparsity_level' parameter of RegroupSparsifier"):
        sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight", "sparsity_level": 1}])
    with pytest.raises(TypeError, match="overrides fields of RegroupOptions by name"):
        sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight", "layers": "0.*"}])
    assert not any(hasattr(m, "parametrizations") for m in model)   # nothing prepared
    with pytest.raises(ValueError, match="'budget_scope' parameter of RegroupSparsifier"):
        RegroupSparsifier(budget_scope="global")
    with pytest.raises(ValueError, match="'sparsity_level' parameter of RegroupSparsifier"):
        RegroupSparsifier(sparsity_level=-0.1)
    # layers: globs over weight names, selecting among the configured tensors
    # (config=None: every Linear).
    sparsifier = RegroupSparsifier(sparsity_level=0.85, block=16, method="metis",
                                   layers="2.*")
    sparsifier.prepare(model, config=None)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["2.weight"]
    assert sparsifier.groups[0]["options"] == RegroupOptions(block=16, method="metis",
                                                             layers="2.*")
    sparsifier.step()
    assert set(sparsifier.results) == {"2.weight"}
    assert not hasattr(model[0], "parametrizations")


def test_imp_layers_are_weight_globs_and_arguments_are_checked_before_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    calls = []

    def train(m, r):
        calls.append(r)

    hist = imp_regroup(model, train, rounds=1, sparsity=0.8, layers="2.weight", block=16,
                       method="metis")
    assert calls == [0, 1]
    assert set(hist[-1]["plan"].layers) == {"2.weight"}
    assert hasattr(model[2], "weight_mask")
    assert not hasattr(model[0], "weight_mask") and not hasattr(model[4], "weight_mask")
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    for kwargs, kind, match in [
            ({"block": 0}, ValueError, "'block' parameter of imp_regroup"),
            ({"method": None}, TypeError, r"plain IMP without regrouping is regroup=False"),
            ({"rounds": 0}, ValueError, "'rounds' parameter of imp_regroup"),
            ({"sparsity": 1.0}, ValueError, "'sparsity' parameter of imp_regroup"),
            ({"mode": "fold"}, RegroupError, r"imp_regroup\(mode='fold'\) .* example_inputs"),
            ({"layers": "0"}, RegroupError, r"Sequential: no layer matches .*'0'"),
            ({"regroup": "no"}, TypeError, "'regroup' parameter of imp_regroup")]:
        args = {"rounds": 1, "sparsity": 0.5, **kwargs}
        with pytest.raises(kind, match=match):
            imp_regroup(fresh, train, **args)
    assert calls == [0, 1] and not hasattr(fresh[0], "weight_mask")
