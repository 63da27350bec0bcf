"""One model-wide block budget across layers."""
import numpy as np
import pytest

from regroup import Budget, check_layout, from_array, regroup_file, regroup_pattern
from regroup.allocation import allocate_global
from regroup.cli import main

from .conftest import EXAMPLE, random_mask


def _layers(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(64, 96, 0.05), (128, 64, 0.3), (32, 128, 0.15)]
    pats = [from_array(random_mask(rng, n, m, d), name=f"l{i}")
            for i, (n, m, d) in enumerate(shapes)]
    return [(p, regroup_pattern(p, block=16, method="metis")) for p in pats]


def _kept_nnz(pairs, results):
    return sum(int(p.binary().multiply(r.mask2d).sum()) for (p, _), r in zip(pairs, results))


def test_global_iso_respects_the_total_area_and_beats_per_layer():
    pairs = _layers()
    out = allocate_global(pairs, Budget())
    total_nnz = sum(p.nnz for p, _ in pairs)
    assert sum(int(r.mask.sum()) for r in out) <= total_nnz
    # Equal-area blocks: the global greedy choice is optimal for the fixed permutations, and
    # the per-layer choice is one feasible choice of the same total area.
    assert _kept_nnz(pairs, out) >= _kept_nnz(pairs, [r for _, r in pairs])
    for (_, r0), r in zip(pairs, out):
        check_layout(r.mask2d, r.format, r.block_shape, r.row_perm, r.col_perm, r.panel_cols)
        np.testing.assert_array_equal(r.row_perm, r0.row_perm)
        assert r.metrics["budget_scope"] == "global"
        assert r.metrics["allotted_area"] == r.mask.sum()


def test_layer_min_one_keeps_the_per_layer_choice_and_pools_leftovers():
    pairs = _layers(1)
    out = allocate_global(pairs, Budget(), layer_min=1.0)
    for (_, r0), r in zip(pairs, out):
        assert np.all(r.mask[r0.mask])                 # every per-layer block is still kept
    # Only the per-layer leftovers (nnz minus kept area, each below one block) are pooled.
    leftover = sum(p.nnz - int(r0.mask.sum()) for p, r0 in pairs)
    extra = sum(int(r.mask.sum() - r0.mask.sum()) for (_, r0), r in zip(pairs, out))
    assert 0 <= extra <= leftover


def test_layer_min_keeps_every_layer_alive():
    pairs = _layers(2)
    out = allocate_global(pairs, Budget("blocks", 2), layer_min=0.5)
    assert all(r.metrics["kept_blocks"] >= 1 for r in out)
    assert sum(r.metrics["kept_blocks"] for r in out) <= 2 * len(pairs)


@pytest.mark.parametrize("budget", ["density=0.2", "retained=0.5", "iso=2"])
def test_other_budget_kinds(budget):
    pairs = _layers(3)
    b = Budget.parse(budget)
    out = allocate_global(pairs, b, refine=True)
    area = sum(int(r.mask.sum()) for r in out)
    if b.kind == "density":
        assert area <= 0.2 * sum(p.n_rows * p.n_cols for p, _ in pairs) + 1e-9
    elif b.kind == "iso":
        assert area <= 2 * sum(p.nnz for p, _ in pairs)
    else:
        total = sum(p.nnz for p, _ in pairs)
        assert _kept_nnz(pairs, out) >= 0.5 * total - 1e-9


def test_bad_layer_min():
    with pytest.raises(ValueError, match="'layer_min' parameter of allot"):
        allocate_global(_layers(), Budget(), layer_min=2)


def test_regroup_file_and_cli_global_scope(tmp_path):
    run = regroup_file(EXAMPLE, block=16, budget_scope="global")
    assert run.options.budget_scope == "global"
    assert sum(r.metrics["kept_area"] for r in run.layers) <= sum(
        r.metrics["nnz"] for r in run.layers)
    assert main(["run", str(EXAMPLE), "--block", "16", "--budget-scope", "global",
                 "--layer-min", "0.25", "-q", "-o", str(tmp_path / "g.npz")]) == 0
