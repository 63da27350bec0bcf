"""regroup_model(chain=...): layers planned again by which features their neighbours use."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

import regroup  # noqa: E402
from regroup import RegroupError, RegroupOptions, regroup_file, regroup_pattern  # noqa: E402
from regroup.adapters.torch import (layer_masks, regroup_model,  # noqa: E402
                                    regroup_unstructured, to_block_sparse)
from tests.torch_zoo import pruned, zoo  # noqa: E402

EXAMPLE = regroup.__file__.rpartition("/")[0] + "/data/example.npz"


def _chain_mlp() -> nn.Sequential:
    """Three Linear layers pruned together to 90 % (global L1): the last layers keep few
    blocks, so which features survive across layers matters."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 32))
    prune.global_unstructured([(m[i], "weight") for i in (0, 2, 4)], prune.L1Unstructured,
                              amount=0.9)
    return m


def _masks(model):
    return {k: v[1].bool().reshape(v[1].shape[0], -1).numpy()
            for k, v in layer_masks(model).items()}


def _flowing(masks):
    """Per consecutive pair: features the producer's kept blocks write AND the
    consumer's kept blocks read."""
    a, b, c = masks["0.weight"], masks["2.weight"], masks["4.weight"]
    return [int((a.any(1) & b.any(0)).sum()), int((b.any(1) & c.any(0)).sum())]


def test_chain_gathers_blocks_on_features_that_flow():
    x = torch.randn(2, 64)
    plain, chained = _chain_mlp(), _chain_mlp()
    p0 = regroup_model(plain, block=8, mode="runtime", example_inputs=(x,), chain=None)
    p1 = regroup_model(chained, block=8, mode="runtime", example_inputs=(x,), chain=0.01)
    m0, m1 = _masks(plain), _masks(chained)
    f0, f1 = _flowing(m0), _flowing(m1)
    assert all(b >= a for a, b in zip(f0, f1)) and sum(f1) > sum(f0)
    # The same area per layer (iso budget of the same pattern).
    for n in m0:
        assert m0[n].sum() == m1[n].sum()
    assert all(r.metrics["chain"] == 0.01 for r in p1.layers.values())
    # Re-planned as warm starts from the first plan, not by the partitioners again.
    assert all(r.metrics["chosen"] == "warm" for r in p1.layers.values())
    assert not any("chain" in r.metrics for r in p0.layers.values())
    assert p1.options.chain == 0.01 and p1.notes[-1].startswith("chain 0.01: 3 of 3 layers")
    # retained_magnitude stays in the layer's own units.
    for r in p1.layers.values():
        assert 0 < r.metrics["retained_magnitude"] <= 1
    # Deterministic.
    again = _chain_mlp()
    regroup_model(again, block=8, mode="runtime", example_inputs=(x,), chain=0.01)
    assert all(np.array_equal(m1[n], v) for n, v in _masks(again).items())


@pytest.mark.parametrize("name", sorted(zoo()))
@pytest.mark.parametrize("mode", ["fold", "runtime"])
def test_chained_model_computes_the_masked_model(name, mode):
    """Folded sides keep their orders: the regrouped model, and its block-sparse
    version, compute the pruned model with the plan's masks."""
    model, x = pruned(name)
    plan = regroup_model(model, block=8, mode=mode, example_inputs=(x,), method="sort",
                         chain=0.05)
    ref, _ = pruned(name)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for lname, r in plan.layers.items():
            modules[lname[:-len(".weight")]].weight_mask.copy_(torch.from_numpy(r.mask))
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    sparse = copy.deepcopy(model)
    to_block_sparse(sparse, plan, backend="dense")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), expected, rtol=0, atol=1e-5)
    if name == "transformer":
        # q and k read LayerNorm outputs (mixed features, never constant) and feed the
        # attention scores: nothing tells which of their features are dead.
        assert "chain" not in plan.layers["attn.q.weight"].metrics
        assert "chain" not in plan.layers["attn.k.weight"].metrics

def test_chain_option_is_validated_recorded_and_model_only(tmp_path):
    opts = RegroupOptions(chain=0.01)
    assert opts.record()["chain"] == 0.01 and RegroupOptions.from_record(opts.record()) == opts
    assert RegroupOptions().chain == "auto"
    assert "chain" not in RegroupOptions().record()       # records as before the option
    assert opts.per_layer().chain is None
    for bad in (0, 1.0, -0.5, float("nan"), "Auto"):
        with pytest.raises((ValueError, TypeError), match="'chain' parameter of "
                           r"RegroupOptions must be None, 'auto' or a float in \(0, 1\)"):
            RegroupOptions(chain=bad)
    with pytest.raises(TypeError, match="'chain' parameter"):
        RegroupOptions(chain="0.01")
    with pytest.raises(ValueError, match="'chain' parameter of RegroupOptions must be None"):
        RegroupOptions(format="nm", chain=0.01)
    assert RegroupOptions(format="nm").chain is None      # "auto": no chain for N:M
    w = np.random.default_rng(0).standard_normal((32, 32))
    pat = regroup.from_array(w * (np.abs(w) > 1), name="fc.weight")
    with pytest.raises(ValueError, match="'chain' parameter of regroup_pattern must be "
                                         "None or 'auto': .* only regroup_model traces"):
        regroup_pattern(pat, block=8, chain=0.01)
    assert regroup_pattern(pat, block=8, chain="auto").mask.shape == (32, 32)
    with pytest.raises(ValueError, match="'chain' parameter of regroup_file must be None"):
        regroup_file(EXAMPLE, block=16, chain=0.01)
    lin = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="'chain' parameter of regroup_unstructured"):
        regroup_unstructured(lin, "weight", amount=0.9, block=8, chain=0.01)
    model = _chain_mlp()
    with pytest.raises(RegroupError, match=r"chain=\.\.\.\) traces the model"):
        regroup_model(model, block=8, mode="runtime", chain=0.01)
    with pytest.raises(ValueError, match="'chain' parameter of regroup_model must be None "
                                         "or 'auto' with budget_scope='global'"):
        regroup_model(model, block=8, mode="runtime", example_inputs=(torch.randn(2, 64),),
                      chain=0.01, budget_scope="global")


def test_chain_auto_is_on_where_the_model_is_traced_with_a_layer_budget():
    # "auto" (the default) is CHAIN_AUTO with example inputs and a per-layer budget, and
    # off without them; the plan records what it became.
    x = torch.randn(2, 64)
    on = regroup_model(_chain_mlp(), block=8, mode="runtime", example_inputs=(x,))
    assert on.options.chain == regroup.options.CHAIN_AUTO == 0.01
    assert on.options.record()["chain"] == 0.01 and on.notes[-1].startswith("chain 0.01")
    explicit = _chain_mlp()
    regroup_model(explicit, block=8, mode="runtime", example_inputs=(x,), chain=0.01)
    assert all(np.array_equal(a, b) for a, b in zip(_masks(explicit).values(),
                                                    _masks(_applied(on)).values()))
    off = regroup_model(_chain_mlp(), block=8, mode="runtime")          # nothing traced
    assert off.options.chain is None and off.options.record()["chain"] is None
    glob = regroup_model(_chain_mlp(), block=8, mode="runtime", example_inputs=(x,),
                         budget_scope="global")
    assert glob.options.chain is None
    assert not any("chain" in r.metrics for p in (off, glob) for r in p.layers.values())


def _applied(plan):
    model = _chain_mlp()
    plan.apply(model)
    return model


def test_a_saved_plan_keeps_what_chain_became(tmp_path):
    # Saved and loaded, a plan's options say what "auto" became (None here: not traced),
    # and a plan recorded before the option reads as planned without chain.
    plan = regroup_model(_chain_mlp(), block=8, mode="runtime")
    plan.save(tmp_path / "p.npz")
    from regroup.adapters.torch import Plan
    assert Plan.load(tmp_path / "p.npz").options.chain is None
    traced = regroup_model(_chain_mlp(), block=8, mode="runtime",
                           example_inputs=(torch.randn(2, 64),))
    traced.save(tmp_path / "t.npz")
    assert Plan.load(tmp_path / "t.npz").options.chain == 0.01
    # leaving N:M restores the default
    assert RegroupOptions(format="nm").replace(format="grid").chain == "auto"


def test_chain_replans_anneal_unfolded_rows_as_the_first_plan_did():
    x = torch.randn(2, 64)
    model = _chain_mlp()
    plan = regroup_model(model, block=8, mode="runtime", example_inputs=(x,), chain=0.01,
                         anneal=0.02)
    for r in plan.layers.values():
        assert r.metrics["chosen"] == "warm" and r.metrics["anneal_gain"] >= 0
