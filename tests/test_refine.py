"""The retained-mass local search: never worse than its start, budget and sizes kept."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regroup import check_layout
from regroup.blocks import Budget, build_layout, layout_mask
from regroup.refine import refine

from .conftest import random_mask


def _mass(V, lay):
    return float(sp.csr_matrix(V).multiply(layout_mask(lay)).sum())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 60), st.integers(4, 60), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["grid", "shuffled"]), st.sampled_from(["iso", "density=0.25",
                                                                "blocks=4"]),
       st.integers(0, 10**6))
def test_refine_never_worse_keeps_budget_and_sizes(n, m, br, bc, fmt, budget, seed):
    rng = np.random.default_rng(seed)
    br, bc = min(br, n), min(bc, m)
    w = rng.random((n, m)) * random_mask(rng, n, m, 0.2)
    V = sp.csr_matrix(w)
    b = Budget.parse(budget)
    start = build_layout(V, rng.permutation(n), rng.permutation(m), (br, bc), fmt, b, V.nnz)
    out = refine(V, start, b, V.nnz)
    assert _mass(V, out) >= _mass(V, start) - 1e-9
    assert sorted(out.row_perm.tolist()) == list(range(n))
    if fmt == "grid":
        assert sorted(out.col_perm.tolist()) == list(range(m))
    mask = layout_mask(out)
    check_layout(mask, fmt, (br, bc), out.row_perm, out.col_perm, out.panel_cols)
    if b.kind == "iso":
        assert mask.sum() <= V.nnz
    elif b.kind == "density":
        assert mask.sum() <= 0.25 * n * m + 1e-9
    else:
        assert out.kept_blocks <= 4
    again = refine(V, start, b, V.nnz)                 # deterministic
    np.testing.assert_array_equal(again.row_perm, out.row_perm)


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_refine_recovers_a_planted_layout_from_mixed_panels(fmt):
    # Rows 0-7 are dense on columns 0-7, rows 8-15 on columns 8-15; the start mixes
    # 5 + 3 rows of the two groups in each panel.
    n, m, b = 16, 16, 8
    w = np.zeros((n, m))
    w[:8, :8] = 1
    w[8:, 8:] = 1
    V = sp.csr_matrix(w)
    rows = np.array([0, 1, 2, 3, 4, 8, 9, 10, 5, 6, 7, 11, 12, 13, 14, 15])
    cols = np.array([0, 1, 2, 3, 4, 8, 9, 10, 5, 6, 7, 11, 12, 13, 14, 15])
    start = build_layout(V, rows, cols, (b, b), fmt, Budget(), V.nnz)
    out = refine(V, start, Budget(), V.nnz)
    assert _mass(V, out) == V.sum() > _mass(V, start)


def test_annealing_is_deterministic_never_loses_and_climbs_from_a_poor_start():
    from regroup import from_array, regroup_pattern
    from regroup.anneal import anneal, moves_for
    from regroup.blocks import Budget, build_layout
    from regroup.synthetic import planted_mask

    pl = planted_mask(128, 96, block=16, block_density=0.2, seed=1)
    pat = from_array(pl.weight)
    V = pat.binary()
    untouched = V.copy()
    for fmt in ("grid", "shuffled"):
        start = build_layout(V, np.arange(128), np.arange(96) if fmt == "grid" else None,
                             (16, 16), fmt, Budget(), pat.nnz)
        a = anneal(V, start, Budget(), pat.nnz, seconds=0.5, seed=3)
        b = anneal(V, start, Budget(), pat.nnz, seconds=0.5, seed=3)
        np.testing.assert_array_equal(a.row_perm, b.row_perm)
        assert a.kept_mass > 1.2 * start.kept_mass      # from the natural order: far better
        assert moves_for(0.5, (128, 96), (16, 16), fmt) > 100
        assert (V != untouched).nnz == 0 and V.has_canonical_format
    # Through the engine, with refinement off (annealing alone) and on.
    plain = regroup_pattern(pat, block=16, method="identity")
    annealed = regroup_pattern(pat, block=16, method="identity", anneal=0.5)
    assert not annealed.metrics["refined"]
    assert annealed.metrics["retained"] > 1.2 * plain.metrics["retained"]
    assert annealed.metrics["anneal_gain"] > 0
    polished = regroup_pattern(pat, block=16, method="sort", anneal=0.5, refine=True)
    again = regroup_pattern(pat, block=16, method="sort", anneal=0.5, refine=True)
    np.testing.assert_array_equal(polished.mask, again.mask)
    refined = regroup_pattern(pat, block=16, method="sort", refine=True)
    assert polished.metrics["retained"] >= refined.metrics["retained"]
    with pytest.raises(ValueError, match="'anneal' parameter of regroup_pattern moves rows"):
        regroup_pattern(pat, block=16, anneal=0.5, row_perm=np.arange(128))
