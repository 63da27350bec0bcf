"""The retained-mass local search: never worse than its start, budget and sizes kept."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regroup import check_layout
from regroup.blocks import Budget, build_layout, layout_mask
from regroup.refine import refine, refine_shared

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
    # start's blocks are build_layout's choice: skipping the choice for steps that move
    # nothing to another group changes nothing
    fast = refine(V, start, b, V.nnz, chosen=True)
    np.testing.assert_array_equal(layout_mask(fast), mask)
    assert fast.kept_mass == out.kept_mass


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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(8, 40), st.integers(8, 40), st.integers(8, 40), st.integers(2, 6),
       st.sampled_from(["grid", "shuffled"]), st.integers(0, 10**6))
def test_refine_shared_never_lowers_the_sum_and_keeps_orders_shared(h, a, c, b, fmt, seed):
    """Layer P's rows and layer Q's columns share order "h" (grid: Q's columns; shuffled:
    both layers share rows instead); a third layer's rows are frozen."""
    rng = np.random.default_rng(seed)
    b = min(b, h, a, c)
    P = sp.csr_matrix(rng.random((h, a)) * random_mask(rng, h, a, 0.25))
    Q = sp.csr_matrix(rng.random((c, h)) * random_mask(rng, c, h, 0.25))
    Qs = sp.csr_matrix(rng.random((h, c)) * random_mask(rng, h, c, 0.25))
    R = sp.csr_matrix(rng.random((a, c)) * random_mask(rng, a, c, 0.25))
    budget = Budget.parse("iso")
    pi, ri = rng.permutation(h), rng.permutation(a)

    def lay(V, rp, cp):
        return build_layout(V, rp, cp, (b, b), fmt, budget, V.nnz)
    if fmt == "grid":
        layers = [(P, lay(P, pi, rng.permutation(a)), budget, P.nnz),
                  (Q, lay(Q, rng.permutation(c), pi), budget, Q.nnz),
                  (R, lay(R, ri, rng.permutation(c)), budget, R.nnz)]
        rows, cols = ["h", None, "r"], [None, "h", None]
    else:
        layers = [(P, lay(P, pi, None), budget, P.nnz), (Qs, lay(Qs, pi, None), budget, Qs.nnz),
                  (R, lay(R, ri, None), budget, R.nnz)]
        rows, cols = ["h", "h", "r"], [None, None, None]

    def total(ls):
        return sum(x.kept_mass / V.sum() for (V, _, _, _), x in zip(layers, ls))
    out = refine_shared(layers, rows, cols, frozen={"r"})
    assert total(out) >= total([x for _, x, _, _ in layers]) - 1e-9
    shared = [x.row_perm if rows[i] == "h" else x.col_perm for i, x in enumerate(out)
              if "h" in (rows[i], cols[i])]
    assert all(np.array_equal(s, shared[0]) for s in shared)
    np.testing.assert_array_equal(out[2].row_perm, ri)                 # frozen
    for (_, _, _, nnz), x in zip(layers, out):
        check_layout(layout_mask(x), fmt, (b, b), x.row_perm, x.col_perm, x.panel_cols)
        assert layout_mask(x).sum() <= nnz
    again = refine_shared(layers, rows, cols, frozen={"r"})
    assert all(np.array_equal(x.row_perm, y.row_perm) for x, y in zip(out, again))


def test_refine_shared_recovers_a_planted_shared_order():
    """Two layers share a hidden dimension whose features come in planted groups of 8
    (rows of P, columns of Q); from a scrambled shared order, each layer refined on its
    own side, the joint search moves the shared order towards the groups (a local
    search: it climbs from 0.80 to 1.14 of 2 here, not to the planted 2)."""
    rng = np.random.default_rng(0)
    h, b = 64, 8
    groups = rng.permutation(h)
    P = np.zeros((h, 48))
    Q = np.zeros((40, h))
    for g in range(h // b):
        feats = groups[g * b:(g + 1) * b]
        P[np.ix_(feats, rng.choice(48, 8, replace=False))] = 1.0
        Q[np.ix_(rng.choice(40, 8, replace=False), feats)] = 1.0
    P, Q = sp.csr_matrix(P), sp.csr_matrix(Q)
    budget = Budget.parse("iso")
    pi = rng.permutation(h)
    start = [refine(P, build_layout(P, pi, np.arange(48), (b, b), "grid", budget), budget,
                    P.nnz, rows=False),
             refine(Q, build_layout(Q, np.arange(40), pi, (b, b), "grid", budget), budget,
                    Q.nnz, cols=False)]
    layers = [(P, start[0], budget, P.nnz), (Q, start[1], budget, Q.nnz)]
    out = refine_shared(layers, ["h", None], [None, "h"])
    before = start[0].kept_mass / P.sum() + start[1].kept_mass / Q.sum()
    after = out[0].kept_mass / P.sum() + out[1].kept_mass / Q.sum()
    assert after > before + 0.3


def test_refine_shared_refuses_disagreeing_members():
    rng = np.random.default_rng(0)
    V = sp.csr_matrix(rng.random((16, 16)) * random_mask(rng, 16, 16, 0.3))
    budget = Budget.parse("iso")
    a = build_layout(V, np.arange(16), np.arange(16), (4, 4), "grid", budget)
    b = build_layout(V, rng.permutation(16), np.arange(16), (4, 4), "grid", budget)
    with pytest.raises(ValueError, match="disagree"):
        refine_shared([(V, a, budget, V.nnz), (V, b, budget, V.nnz)], ["h", "h"], [None, None])
    with pytest.raises(ValueError, match="differ in length"):
        refine_shared([(V, a, budget, V.nnz)], ["h", None], [None])
