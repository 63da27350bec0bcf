"""Dynamic sparse training core (regroup.dst) and the engine's warm start.

Layer densities against hand-worked answers and a literal port of RigL's loop; the drop
schedule; units against a slow per-unit reference; drop/grow on hand-made scores; the
churn bound; warm starts that never lose what they start from.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regroup import RegroupError, RegroupOptions, check_layout, from_array, regroup_pattern
from regroup.blocks import Budget, Layout, build_layout, layout_mask
from regroup.dst import (DISTRIBUTIONS, RTOL, Units, churn, drop_count, drop_fraction, drop_grow,
                         erk_densities, layer_densities, layout_units, make_units,
                         relayout, uniform_densities, unit_scores, units_for_density,
                         units_kept, units_layout, units_mask, update_layout)
from regroup.engine import WARM_ROUNDS
from regroup.io import read_smtx
from regroup.pattern import from_sparse
from regroup.result import load_result, save_result

from .conftest import dlmc_files, random_mask

# Weight shapes of real networks: WRN-22-2 on CIFAR (first conv has 3 input channels) and
# ResNet-50's stem, a bottleneck and its classifier.
WRN = [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3),
       (128, 128, 3, 3), (64, 32, 1, 1), (10, 128)]
RN50 = [(64, 3, 7, 7), (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (512, 1024, 1, 1),
        (2048, 512, 1, 1), (1000, 2048)]


def _sizes(shapes):
    return np.array([math.prod(s) for s in shapes], dtype=float)


def _rigl_erk(shapes, sparsity):
    """A literal port of RigL's ``get_sparsities_erdos_renyi`` (include_kernel=True,
    power 1, no custom map): the oracle."""
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, s in enumerate(shapes):
            n_param = math.prod(s)
            n_zeros = n_param * sparsity
            if i in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_param - n_zeros
                raw[i] = sum(s) / math.prod(s)
                divisor += raw[i] * n_param
        if not raw:     # every layer dense (RigL would fail on max() of nothing)
            break
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            for i, p in raw.items():
                if p == max_prob:
                    dense_layers.add(i)
        else:
            break
    return [1.0 if i in dense_layers else eps * raw[i] for i in range(len(shapes))]


# -- layer densities ---------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [WRN, RN50], ids=["wrn22-2", "resnet50"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_densities_keep_the_target_share_of_all_weights(shapes, sparsity, distribution):
    d = layer_densities(shapes, sparsity, distribution=distribution)
    sizes = _sizes(shapes)
    assert d.shape == (len(shapes),) and ((0 <= d) & (d <= 1)).all()
    assert (d * sizes).sum() == pytest.approx((1 - sparsity) * sizes.sum(), rel=1e-12)
    if distribution == "uniform":
        np.testing.assert_allclose(d, 1 - sparsity)


def test_erk_hand_worked_cap():
    # raw 0.2 and 0.02; eps = 5050 / 220 makes layer 0 dense (4.59), then the other
    # layer keeps 5050 - 100 = 4950 of its 10000 weights.
    np.testing.assert_allclose(erk_densities([(10, 10), (100, 100)], 0.5), [1.0, 0.495])


def test_erk_caps_the_small_first_conv_and_scales_the_rest_alike():
    d = erk_densities(WRN, 0.9)
    raw = np.array([sum(s) / math.prod(s) for s in WRN])
    capped = d == 1.0
    # The 3-input-channel conv, the 1x1 shortcut and the classifier are dense.
    assert capped.tolist() == [True, False, False, False, False, False, True, True]
    eps = d[~capped] / raw[~capped]
    np.testing.assert_allclose(eps, eps[0])      # one eps for every layer not capped
    assert (raw[capped] * eps[0] > 1).all()      # ... which would put the capped above 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])),
                min_size=1, max_size=6),
       st.floats(0.0, 0.995))
def test_erk_matches_rigls_loop(dims, sparsity):
    shapes = [(a, b, k, k) if k > 1 else (a, b) for a, b, k in dims]
    np.testing.assert_allclose(erk_densities(shapes, sparsity), _rigl_erk(shapes, sparsity),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_dense_layers_count_in_the_budget(distribution):
    d = layer_densities(RN50, 0.9, distribution=distribution, dense=[0])   # the stem
    sizes = _sizes(RN50)
    assert d[0] == 1.0
    assert (d * sizes).sum() == pytest.approx(0.1 * sizes.sum(), rel=1e-12)
    free = layer_densities(RN50, 0.9, distribution=distribution)
    assert free[0] < 1
    assert (d[1:] <= free[1:] + 1e-12).all() and (d[1:] < free[1:]).any()
    if distribution == "uniform":
        np.testing.assert_allclose(d[1:], d[1])


@pytest.mark.parametrize("call, kind, match", [
    (lambda: erk_densities(WRN, 1.0), ValueError, r"'sparsity' parameter of erk_densities "
                                                  r"must be a float in \[0, 1\)"),
    (lambda: erk_densities(WRN, -0.1), ValueError, "'sparsity'"),
    (lambda: erk_densities(WRN, "0.9"), TypeError, "'sparsity'"),
    (lambda: erk_densities([], 0.9), ValueError, "'shapes' parameter of erk_densities"),
    (lambda: erk_densities([(3, 0)], 0.9), ValueError, r"Got \(3, 0\) at index 0"),
    (lambda: erk_densities(WRN, 0.9, dense=[8]), ValueError, r"indices in \[0, 8\)"),
    (lambda: erk_densities(WRN, 0.9, dense=[1, 1]), ValueError, "'dense' parameter"),
    (lambda: erk_densities([(10, 10), (1000, 1000)], 0.9, dense=[1]), ValueError,
     "layers kept dense hold 1000000 weights"),
    (lambda: layer_densities(WRN, 0.9, distribution="er"), ValueError,
     "'distribution' parameter of layer_densities must be one of 'erk', 'uniform'"),
])
def test_density_errors(call, kind, match):
    with pytest.raises(kind, match=match):
        call()


def test_uniform_without_dense_layers_is_flat():
    np.testing.assert_allclose(uniform_densities(WRN, 0.8), 0.2)


# -- schedule ----------------------------------------------------------------------------------
def test_drop_fraction_follows_the_cosine_and_stops():
    assert drop_fraction(0, 100) == pytest.approx(0.3)
    assert drop_fraction(50, 100) == pytest.approx(0.15)
    assert drop_fraction(100, 100) == pytest.approx(0.0, abs=1e-15)
    assert drop_fraction(101, 100) == 0.0 and drop_fraction(10**6, 100, alpha=0.5) == 0.0
    assert drop_fraction(0, 10, alpha=0.5) == pytest.approx(0.5)
    ts = np.linspace(0, 120, 241)
    f = np.array([drop_fraction(t, 100) for t in ts])
    assert (np.diff(f) <= 1e-15).all() and (f >= 0).all()


@pytest.mark.parametrize("args, match", [((0, 0), "'t_end' parameter of drop_fraction"),
                                         ((-1, 10), "'t' parameter"),
                                         ((1, 10, 1.5), "'alpha' parameter"),
                                         ((float("nan"), 10), "'t' parameter")])
def test_drop_fraction_errors(args, match):
    with pytest.raises(ValueError, match=match):
        drop_fraction(*args)


def test_drop_count_rounds_down_but_forgives_float_error():
    assert drop_count(10, 0.3) == 3           # 0.3 * 10 is 3.0000000000000004
    assert drop_count(100, 0.29) == 29        # 0.29 * 100 is 28.999999999999996
    assert drop_count(7, 0.3) == 2 and drop_count(0, 0.3) == 0 and drop_count(5, 1.0) == 5
    for k in range(0, 200, 7):
        for f in (0.01, 0.1, 0.15, 0.3):
            assert drop_count(k, f) <= f * k * (1 + 1e-9)


# -- units -------------------------------------------------------------------------------------
@st.composite
def unit_cases(draw):
    n, m = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    br, bc = draw(st.integers(1, n)), draw(st.integers(1, m))
    fmt = draw(st.sampled_from(["grid", "shuffled"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kwargs = {"row_perm": rng.permutation(n)}
    if fmt == "grid":
        kwargs["col_perm"] = rng.permutation(m)
    else:
        short = m % bc
        panels = []
        for _ in range(-(-n // br)):
            order = rng.permutation(m)
            cols = order[:bc * int(rng.integers(0, m // bc + 1))]
            if short and rng.random() < 0.5:
                cols = np.concatenate([cols, order[m - short:]])
            panels.append(cols)
        kwargs["panel_cols"] = panels
        if rng.random() < 0.5:
            kwargs["rank"] = rng.standard_normal((n, m))
    units = make_units((n, m), (br, bc), fmt, **kwargs)
    return units, rng


def _slow_scores(values, u: Units, power):
    br, bc = u.block_shape
    P, Q = u.table_shape
    out = np.zeros((P, Q))
    for p in range(P):
        rows = u.row_perm[p * br:(p + 1) * br]
        for j in range(Q):
            cols = u.col_orders[p, j * bc:(j + 1) * bc]
            out[p, j] = (np.abs(values[np.ix_(rows, cols)]) ** power).sum()
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit_cases(), st.sampled_from([1, 2, 0.5]))
def test_unit_scores_match_a_slow_reference(case, power):
    u, rng = case
    values = rng.standard_normal(u.shape) * (rng.random(u.shape) < 0.6)
    np.testing.assert_allclose(unit_scores(values, u, power=power),
                               _slow_scores(values, u, power), rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit_cases())
def test_units_partition_the_matrix_and_kept_sets_are_masks(case):
    u, rng = case
    n, m = u.shape
    area = u.area()
    assert area.sum() == n * m
    # Each unit covers exactly its area: disjoint units, covering everything.
    np.testing.assert_array_equal(unit_scores(np.ones((n, m)), u, power=1), area)
    # Every panel orders every column once.
    assert all(np.array_equal(np.sort(o), np.arange(m)) for o in u.col_orders)
    kept = rng.random(u.table_shape) < 0.4
    mask = units_mask(u, kept)
    assert mask.sum() == area[kept].sum()
    np.testing.assert_array_equal(units_kept(u, mask), kept)
    np.testing.assert_array_equal(units_mask(u, units_kept(u, mask)), mask)
    lay = units_layout(u, kept, unit_scores(np.ones((n, m)), u, power=1))
    check_layout(mask, u.format, u.block_shape, lay.row_perm, lay.col_perm, lay.panel_cols)
    np.testing.assert_array_equal(layout_mask(lay), mask)
    assert lay.kept_area == mask.sum() and lay.kept_mass == pytest.approx(mask.sum())


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_layout_units_reproduce_the_layout(fmt):
    rng = np.random.default_rng(3)
    w = rng.random((36, 22)) * random_mask(rng, 36, 22, 0.3)     # short edge blocks
    V = sp.csr_matrix(w)
    lay = build_layout(V, rng.permutation(36), rng.permutation(22), (8, 4), fmt, Budget(),
                       V.nnz)
    u, kept = layout_units(lay, rank=rng.random((36, 22)))
    assert kept.sum() == lay.kept_blocks
    np.testing.assert_array_equal(units_mask(u, kept), layout_mask(lay))
    mass = unit_scores(w, u, power=1)
    assert mass[kept].sum() == pytest.approx(lay.kept_mass)
    again = units_layout(u, kept, mass)
    np.testing.assert_array_equal(layout_mask(again), layout_mask(lay))
    # A LayerResult stands for its layout as well.
    res = regroup_pattern(from_array(w), block=(8, 4), format=fmt, method="identity")
    ru, rkept = layout_units(res)
    np.testing.assert_array_equal(units_mask(ru, rkept), res.mask2d)
    np.testing.assert_allclose(unit_scores(w, res), unit_scores(w, ru))


def test_shuffled_free_columns_are_tiled_by_rank():
    # One panel of 2 rows, nothing kept: columns by decreasing rank mass 1, 2, 0, 3.
    rank = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 1.0, 0.0]])    # column mass 1, 9, 5, 0
    u = make_units((2, 4), 2, "shuffled", rank=rank)
    np.testing.assert_array_equal(u.col_orders, [[1, 2, 0, 3]])
    np.testing.assert_array_equal(unit_scores(rank, u), [[14.0, 1.0]])
    # Kept tiles come first in panel_cols order; a kept short tile stays the last tile.
    u = make_units((2, 5), 2, "shuffled", panel_cols=[[4, 0, 3]],
                   rank=np.tile([0.0, 1.0, 2.0, 3.0, 4.0], (2, 1)))
    np.testing.assert_array_equal(u.col_orders, [[4, 0, 2, 1, 3]])
    assert units_kept(u, units_mask(u, np.array([[True, False, True]]))).sum() == 2


def test_grid_units_are_blocks_of_the_permuted_grid():
    w = np.arange(24.0).reshape(4, 6)
    u = make_units((4, 6), (2, 3), "grid", row_perm=[3, 2, 1, 0], col_perm=[5, 4, 3, 2, 1, 0])
    R = w[[3, 2, 1, 0]][:, [5, 4, 3, 2, 1, 0]]
    want = (R ** 2).reshape(2, 2, 2, 3).sum(axis=(1, 3))
    np.testing.assert_allclose(unit_scores(w, u), want)
    assert u.col_perm.tolist() == [5, 4, 3, 2, 1, 0]


def test_unit_errors():
    u = make_units((4, 6), 2, "grid")
    with pytest.raises(ValueError, match=r"'values' parameter of unit_scores must have the "
                                         r"units' shape \(4, 6\)"):
        unit_scores(np.ones((4, 5)), u)
    bad = np.ones((4, 6))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="'values' parameter of unit_scores must be finite. "
                                         "Got 1 NaN"):
        unit_scores(bad, u)
    with pytest.raises(ValueError, match="'power' parameter of unit_scores must be a "
                                         "finite number > 0. Got 0"):
        unit_scores(np.ones((4, 6)), u, power=0)
    with pytest.raises(RegroupError, match="not a union of whole units"):
        units_kept(u, np.eye(4, 6))
    with pytest.raises(ValueError, match="'row_perm' parameter of make_units must be a "
                                         r"permutation of range\(4\)"):
        make_units((4, 6), 2, "grid", row_perm=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="'panel_cols' parameter of make_units applies to "
                                         "the shuffled format only"):
        make_units((4, 6), 2, "grid", panel_cols=[[0, 1], []])
    with pytest.raises(ValueError, match="whole tiles of 2"):
        make_units((4, 6), 2, "shuffled", panel_cols=[[0, 1, 2], []])
    with pytest.raises(ValueError, match="'col_perm' parameter of make_units applies to the "
                                         "grid format only"):
        make_units((4, 6), 2, "shuffled", col_perm=np.arange(6))
    with pytest.raises(ValueError, match="'kept' parameter of units_mask must be a bool "
                                         r"array of the units' table shape \(2, 3\)"):
        units_mask(u, np.ones((2, 3), int))
    with pytest.raises(TypeError, match="'units' parameter of unit_scores"):
        unit_scores(np.ones((4, 6)), "grid")


def test_units_for_density_is_dsbs_tile_budget():
    u = make_units((64, 48), 16, "shuffled")
    assert units_for_density(u, 0.25) == 3          # 0.25 * 3072 / 256, exactly
    assert units_for_density(u, 0.26) == 4
    assert units_for_density(u, 1.0) == u.n_units == 12


# -- drop and grow -----------------------------------------------------------------------------
def test_drop_grow_hand_made():
    kept = np.array([True, True, True, False, False, False])
    ws = np.array([3.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    gs = np.array([0.0, 0.0, 0.0, 5.0, 1.0, 7.0])
    out = drop_grow(ws, gs, kept, 2)
    assert out.dropped.tolist() == [1, 2] and out.grown.tolist() == [5, 3]
    assert out.kept.tolist() == [True, False, False, True, False, True]
    assert out.dropped.dtype == np.intp and out.grown.dtype == np.intp


def test_a_just_dropped_unit_may_regrow_as_in_rigl():
    kept = np.array([True, True, False])
    ws, gs = np.array([1.0, 5.0, 0.0]), np.array([9.0, 0.0, 1.0])
    out = drop_grow(ws, gs, kept, 1)
    assert out.dropped.tolist() == [0] and out.grown.tolist() == [0]
    np.testing.assert_array_equal(out.kept, kept)
    out = drop_grow(ws, gs, kept, 1, regrow=False)
    assert out.grown.tolist() == [2] and out.kept.tolist() == [False, True, True]


def test_drop_grow_ties_break_by_lower_index_and_keep_the_shape():
    kept = np.array([[True, False, True], [True, False, False]])
    out = drop_grow(np.ones((2, 3)), np.ones((2, 3)), kept, 2)
    assert out.dropped.tolist() == [0, 2]              # flat C-order indices
    assert out.grown.tolist() == [0, 1]                # 0 just dropped, regrown
    assert out.kept.shape == (2, 3) and out.kept.sum() == 3
    same = drop_grow(np.ones((2, 3)), np.ones((2, 3)), kept, 0)
    np.testing.assert_array_equal(same.kept, kept)
    assert same.dropped.size == same.grown.size == 0


def test_drop_grow_errors():
    kept = np.array([True, True, False])
    with pytest.raises(ValueError, match=r"'n' parameter of drop_grow must be an int in "
                                         r"\[0, 2\]. Got 3"):
        drop_grow(np.zeros(3), np.zeros(3), kept, 3)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_grow(np.zeros(3), np.zeros(3), kept, 2, regrow=False)
    with pytest.raises(ValueError, match="'grad_scores' parameter of drop_grow .* with NaN"):
        drop_grow(np.zeros(3), np.array([0, np.nan, 0]), kept, 1)
    with pytest.raises(ValueError, match="'weight_scores' parameter .* Got shape \\(4,\\)"):
        drop_grow(np.zeros(4), np.zeros(3), kept, 1)
    with pytest.raises(TypeError, match="'kept' parameter of drop_grow must be a bool"):
        drop_grow(np.zeros(3), np.zeros(3), np.array([1, 1, 0]), 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**32 - 1))
def test_drop_grow_invariants(size, fraction, regrow, seed):
    rng = np.random.default_rng(seed)
    kept = rng.random(size) < 0.5
    # Few distinct values, so that ties are common.
    ws, gs = rng.integers(0, 4, size).astype(float), rng.integers(0, 4, size).astype(float)
    k = int(kept.sum())
    n = drop_count(k, fraction) if regrow else min(drop_count(k, fraction), size - k)
    out = drop_grow(ws, gs, kept, n, regrow=regrow)
    assert out.kept.sum() == k and out.dropped.size == out.grown.size == n
    assert kept[out.dropped].all()
    stayed = kept.copy()
    stayed[out.dropped] = False
    assert not stayed[out.grown].any()
    if not regrow:
        assert not kept[out.grown].any()
    if n:
        assert ws[out.dropped].max() <= ws[stayed].min(initial=np.inf)
        pool = ~stayed if regrow else ~kept
        pool[out.grown] = False
        assert gs[out.grown].min() >= gs[pool].max(initial=-np.inf)
    again = drop_grow(ws, gs, kept, n, regrow=regrow)
    np.testing.assert_array_equal(again.dropped, out.dropped)
    np.testing.assert_array_equal(again.grown, out.grown)


# -- churn -------------------------------------------------------------------------------------
def test_churn_is_the_share_of_kept_mass_removed():
    old, new = np.array([True, True, False]), np.array([True, False, True])
    assert churn(old, new, np.array([3.0, 1.0, 9.0])) == pytest.approx(0.25)
    assert churn(old, old, np.ones(3)) == 0.0
    assert churn(old, ~old, np.ones(3)) == 1.0
    assert churn(np.zeros(3, bool), new, np.ones(3)) == 0.0
    with pytest.raises(ValueError, match="'values' parameter of churn must be a finite "
                                         "mass >= 0"):
        churn(old, new, np.array([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="'old' and 'new' parameters of churn"):
        churn(old, new[:2], np.ones(3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit_cases(), st.floats(0.0, 0.5))
def test_drop_by_weight_keeps_churn_within_the_drop_fraction(case, d):
    u, rng = case
    w = rng.standard_normal(u.shape)
    kept = rng.random(u.table_shape) < 0.5
    ws, gs = unit_scores(w, u), unit_scores(rng.standard_normal(u.shape), u)
    out = drop_grow(ws, gs, kept, drop_count(int(kept.sum()), d))
    c = churn(kept, out.kept, ws)
    assert c <= d + 1e-12
    # The same at the level of the weights: units are a partition.
    assert churn(units_mask(u, kept), units_mask(u, out.kept), w ** 2) == pytest.approx(c)


# -- warm start --------------------------------------------------------------------------------
def _pattern(rng, n, m, density):
    return from_array(rng.standard_normal((n, m)) * random_mask(rng, n, m, density))


def _moved(rng, w, share):
    """``w`` after a RigL-like update: ``share`` of its weights pruned, as many grown."""
    w = w.copy()
    on, off = np.flatnonzero(w), np.flatnonzero(w == 0)
    k = int(share * on.size)
    flat = w.reshape(-1)
    flat[rng.choice(on, k, replace=False)] = 0
    flat[rng.choice(off, k, replace=False)] = rng.standard_normal(k)
    return w


def _retained(w, mask):
    a = np.abs(w)
    return float(a[mask].sum() / a.sum())


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_start_never_loses_what_init_keeps(fmt, seed):
    rng = np.random.default_rng(seed)
    opts = RegroupOptions(block=8, format=fmt, budget="density=0.25")
    p0 = _pattern(rng, 96, 64, 0.15)
    init = regroup_pattern(p0, options=opts)
    w1 = _moved(rng, p0.matrix.toarray() * np.sign(rng.standard_normal((96, 64))), 0.3)
    warm = regroup_pattern(from_array(w1), options=opts, init=init)
    assert warm.metrics["chosen"] == "warm"
    assert warm.metrics["warm_start"]["rounds"] == WARM_ROUNDS
    # Blocks of equal area under the same budget: the start re-picks init's blocks at
    # least as well, and refinement never goes below its start.
    assert warm.metrics["retained_magnitude"] >= _retained(w1, init.mask2d) - 1e-12
    assert warm.metrics["retained_magnitude"] >= warm.metrics["warm_start"]["start"] - 1e-12
    assert warm.metrics["refine_gain"] >= 0
    assert warm.metrics["kept_area"] <= 0.25 * 96 * 64
    check_layout(warm.mask2d, fmt, (8, 8), warm.row_perm, warm.col_perm, warm.panel_cols)


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_warm_start_on_a_dlmc_window(fmt, dlmc_dir):
    path = next(f for f in dlmc_files() if "magnitude_pruning/0.8" in str(f)
                and "ffn_conv1" in f.stem)
    M = read_smtx(path)[:128, :96]
    p = from_sparse(M, name=path.stem)
    opts = RegroupOptions(block=16, format=fmt, budget="iso", method="metis")
    init = regroup_pattern(p, options=opts)
    warm = regroup_pattern(p, options=opts, init=init)
    assert warm.metrics["retained"] >= init.metrics["retained"] - 1e-12
    assert warm.metrics["kept_area"] <= p.nnz
    check_layout(warm.mask2d, fmt, (16, 16), warm.row_perm, warm.col_perm, warm.panel_cols)


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_warm_start_from_a_local_optimum_changes_nothing(fmt):
    rng = np.random.default_rng(7)
    p = _pattern(rng, 64, 48, 0.2)
    opts = RegroupOptions(block=8, format=fmt, budget="density=0.3", refine=True)
    init = regroup_pattern(p, options=opts)          # refined until a round gains nothing
    warm = regroup_pattern(p, options=opts, init=init)
    np.testing.assert_array_equal(warm.row_perm, init.row_perm)
    if fmt == "grid":
        np.testing.assert_array_equal(warm.col_perm, init.col_perm)
    else:
        assert all(np.array_equal(a, b) for a, b in zip(warm.panel_cols, init.panel_cols))
    np.testing.assert_array_equal(warm.mask, init.mask)
    assert warm.metrics["refine_gain"] == 0.0
    assert warm.metrics["retained_magnitude"] == pytest.approx(
        init.metrics["retained_magnitude"])


def test_warm_start_keeps_a_planted_optimum_and_fixes_a_shuffled_one():
    # Two dense 8x8 blocks on the diagonal: identity orders keep everything.
    w = np.zeros((16, 16))
    w[:8, :8] = w[8:, 8:] = 1.0
    p = from_array(w)
    best = regroup_pattern(p, block=8, method="identity", refine=False)
    assert best.metrics["retained"] == 1.0
    warm = regroup_pattern(p, block=8, init=best)
    np.testing.assert_array_equal(warm.row_perm, np.arange(16))
    np.testing.assert_array_equal(warm.col_perm, np.arange(16))
    # Rows 3 and 12 swapped: the start loses both of them, refinement puts them back.
    rows = np.arange(16)
    rows[[3, 12]] = rows[[12, 3]]
    mixed = regroup_pattern(p, block=8, row_perm=rows, col_perm=np.arange(16))
    fixed = regroup_pattern(p, block=8, init=mixed)
    assert mixed.metrics["retained"] < 1.0 and fixed.metrics["retained"] == 1.0
    assert fixed.metrics["warm_start"]["start"] == pytest.approx(mixed.metrics["retained"])


def test_warm_start_without_refinement_only_repicks_blocks():
    rng = np.random.default_rng(5)
    p = _pattern(rng, 48, 40, 0.2)
    init = regroup_pattern(p, block=8, method="identity")
    out = regroup_pattern(p, block=8, refine=False, init=init)
    np.testing.assert_array_equal(out.row_perm, init.row_perm)
    np.testing.assert_array_equal(out.mask, init.mask)
    assert out.metrics["refined"] is False and out.metrics["refine_gain"] is None
    assert out.metrics["warm_start"]["rounds"] == 0


def test_warm_start_accepts_dense_scores_and_round_trips(tmp_path):
    rng = np.random.default_rng(9)
    p = _pattern(rng, 32, 32, 0.2)
    init = regroup_pattern(p, block=8, format="shuffled", budget="blocks=4")
    scores = np.abs(p.matrix.toarray()) + 0.01 * rng.random((32, 32))   # every position
    with pytest.raises(RegroupError, match="fully dense"):
        regroup_pattern(from_array(scores), block=8, format="shuffled", budget="blocks=4")
    out = regroup_pattern(from_array(scores), block=8, format="shuffled", budget="blocks=4",
                          init=init, warm_rounds=1)
    assert out.metrics["kept_blocks"] == 4 and out.metrics["warm_start"]["rounds"] == 1
    save_result(tmp_path / "warm.npz", [out])
    back = load_result(tmp_path / "warm.npz")[out.name]
    assert back.metrics["warm_start"] == out.metrics["warm_start"]
    np.testing.assert_array_equal(back.mask, out.mask)


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 48), st.integers(8, 48), st.sampled_from(["grid", "shuffled"]),
       st.integers(0, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_relayout_is_the_warm_start_of_regroup_pattern(n, m, fmt, rounds, k, seed):
    # The re-layout RegroupDST runs is the same search as regroup_pattern(init=...) with
    # the same blocks and rounds (on fully stored scores: both sum them densely).
    rng = np.random.default_rng(seed)
    init = regroup_pattern(_pattern(rng, n, m, 0.3), block=4, format=fmt,
                           budget=f"blocks={k}")
    scores = rng.random((n, m)) + 1e-3                       # every position stored
    lay = relayout(scores, init, k, rounds=rounds)
    check_layout(layout_mask(lay), fmt, (4, 4), lay.row_perm, lay.col_perm, lay.panel_cols)
    assert lay.kept_blocks == min(k, -(-n // 4) * -(-m // 4))     # every block scores
    if rounds:
        want = regroup_pattern(from_array(scores), block=4, format=fmt, budget=f"blocks={k}",
                               method="identity", refine=True, init=init,
                               warm_rounds=rounds)
    else:
        want = regroup_pattern(from_array(scores), block=4, format=fmt, budget=f"blocks={k}",
                               refine=False, init=init)
    np.testing.assert_array_equal(layout_mask(lay), want.mask2d)
    np.testing.assert_array_equal(lay.row_perm, want.row_perm)
    # never below its start: the blocks of most score for init's orders
    start = build_layout(scores, init.row_perm, init.col_perm, (4, 4), fmt,
                         Budget.parse(f"blocks={k}"), n * m)
    assert lay.kept_mass >= start.kept_mass - 1e-9


@pytest.mark.parametrize("case, kwargs, exc, match", [
    ("negative", dict(values=-np.ones((16, 16))), ValueError, "must be non-negative"),
    ("shape", dict(values=np.ones((16, 8))), ValueError, "must have the layout's shape"),
    ("nan", dict(values=np.full((16, 16), np.nan)), ValueError, "must be finite"),
    ("k", dict(k=0), ValueError, "'k' parameter of relayout"),
    ("rounds", dict(rounds=-1), ValueError, "'rounds' parameter of relayout"),
    ("layout", dict(layout="grid"), TypeError, "'layout' parameter of relayout"),
    # the layout checks update_layout makes (one helper): a block that does not fit
    ("block", dict(layout="big"), ValueError,
     "'layout' parameter of relayout must have a block_shape that fits"),
])
def test_relayout_refuses_hostile_input(case, kwargs, exc, match):
    rng = np.random.default_rng(0)
    init = regroup_pattern(_pattern(rng, 16, 16, 0.3), block=4, budget="blocks=2")
    args = {"values": np.ones((16, 16)), "layout": init, "k": 2, "rounds": 1, **kwargs}
    if args["layout"] == "big":
        args["layout"] = dataclasses.replace(init, block_shape=(4, 32))
    with pytest.raises(exc, match=match):
        relayout(args["values"], args["layout"], args["k"], rounds=args["rounds"])


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_warm_start_keeps_the_fixed_sides(fmt):
    # A side folded into a neighbour: the warm start takes the given order and the
    # refinement moves only the other side.
    rng = np.random.default_rng(13)
    opts = RegroupOptions(block=8, format=fmt, budget="density=0.25")
    p0 = _pattern(rng, 64, 48, 0.2)
    init = regroup_pattern(p0, options=opts)
    w1 = _moved(rng, p0.matrix.toarray(), 0.3)
    rows = rng.permutation(64)
    warm = regroup_pattern(from_array(w1), options=opts, init=init, row_perm=rows)
    np.testing.assert_array_equal(warm.row_perm, rows)
    assert warm.metrics["warm_start"]["fixed"] == ["rows"]
    # Grid columns are still refined; shuffled panels have nothing else to move.
    assert warm.metrics["refined"] is (fmt == "grid")
    assert warm.metrics["retained_magnitude"] >= warm.metrics["warm_start"]["start"] - 1e-12
    check_layout(warm.mask2d, fmt, (8, 8), warm.row_perm, warm.col_perm, warm.panel_cols)
    if fmt == "grid":
        cols = rng.permutation(48)
        both = regroup_pattern(from_array(w1), options=opts, init=init, row_perm=rows,
                               col_perm=cols)
        np.testing.assert_array_equal(both.col_perm, cols)
        # Both orders fixed: the blocks of the given orders, re-picked, nothing refined.
        fixed = regroup_pattern(from_array(w1), options=opts, row_perm=rows, col_perm=cols)
        np.testing.assert_array_equal(both.mask, fixed.mask)
        assert both.metrics["refined"] is False
        assert both.metrics["warm_start"]["fixed"] == ["rows", "cols"]
        moved = regroup_pattern(from_array(w1), options=opts, init=init, col_perm=cols)
        np.testing.assert_array_equal(moved.col_perm, cols)
        assert moved.metrics["warm_start"]["fixed"] == ["cols"]


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("seed", range(6))
def test_warm_start_reproduces_init_among_exact_ties(fmt, seed):
    # Mostly stored, values on a 0.1 grid: many blocks tie exactly. The warm start sums
    # the same way as the plan it starts from, so it re-picks the same blocks.
    rng = np.random.default_rng(seed)
    w = np.round(rng.random((24, 20)), 1) * (rng.random((24, 20)) < 0.6)
    for opts in (RegroupOptions(block=4, format=fmt, method="identity",
                                budget="blocks=6", refine=False),
                 RegroupOptions(block=4, format=fmt, budget="blocks=6")):
        init = regroup_pattern(from_array(w), options=opts)
        warm = regroup_pattern(from_array(w), options=opts, init=init)
        np.testing.assert_array_equal(warm.mask, init.mask)


def test_warm_start_reproduces_the_reviewed_tie():
    w = np.array([[.9, 0, .1, 0, .5, .8], [0, 0, 0, 0, .8, .5], [0, 0, 0, .3, .1, .3],
                  [0, 0, .2, .6, .6, .1]])
    opts = RegroupOptions(block=2, method="identity", budget="blocks=2", refine=False)
    init = regroup_pattern(from_array(w), options=opts)
    warm = regroup_pattern(from_array(w), options=opts, init=init)
    np.testing.assert_array_equal(warm.mask, init.mask)


def test_warm_start_anneals_like_the_cold_path():
    rng = np.random.default_rng(4)
    p = _pattern(rng, 48, 32, 0.3)
    init = regroup_pattern(p, block=8, method="identity")
    warm = regroup_pattern(p, block=8, init=init, anneal=0.05, seed=1)
    assert warm.metrics["anneal_gain"] >= 0
    assert warm.metrics["retained_magnitude"] >= warm.metrics["warm_start"]["start"] - 1e-12
    check_layout(warm.mask2d, "grid", (8, 8), warm.row_perm, warm.col_perm, None)
    # Deterministic for a seed.
    again = regroup_pattern(p, block=8, init=init, anneal=0.05, seed=1)
    np.testing.assert_array_equal(again.mask, warm.mask)


def _flipped(mask):
    out = mask.copy()
    out[0, 0] = not out[0, 0]
    return out


@pytest.fixture(scope="module")
def warm_case():
    rng = np.random.default_rng(11)
    p = _pattern(rng, 32, 24, 0.2)
    other = regroup_pattern(_pattern(rng, 32, 32, 0.2), block=8, method="identity")
    return p, regroup_pattern(p, block=8, method="identity"), other


WARM_ERRORS = {
    "format": (lambda g, o: dict(init=g, format="shuffled", block=8), ValueError,
               "'init' parameter of regroup_pattern must be a layout of the options' "
               "format 'shuffled'. Got format 'grid'"),
    "block": (lambda g, o: dict(init=g, block=4), ValueError,
              r"options' block \(4, 4\). Got block \(8, 8\)"),
    "shape": (lambda g, o: dict(init=o, block=8), ValueError,
              r"must be a layout of a 32x24 matrix .* Got shape \(32, 32\)"),
    "row_perm": (lambda g, o: dict(init=dataclasses.replace(g, row_perm=np.zeros(32, np.intp)),
                                   block=8), ValueError,
                 "'init.row_perm' parameter of regroup_pattern is an ordering that is not a "
                 "permutation"),
    "col_perm": (lambda g, o: dict(init=dataclasses.replace(g, col_perm=np.arange(23)),
                                   block=8), ValueError,
                 "'init.col_perm' parameter of regroup_pattern is an ordering of shape"),
    "mask": (lambda g, o: dict(init=dataclasses.replace(g, mask=_flipped(g.mask)), block=8),
             ValueError, "must be a valid grid layout .* not a union of whole grid blocks"),
    "type": (lambda g, o: dict(init="layout", block=8), TypeError,
             "'init' parameter of regroup_pattern must be a LayerResult. Got str"),
    "rounds_alone": (lambda g, o: dict(warm_rounds=2, block=8), ValueError,
                     "'warm_rounds' parameter of regroup_pattern applies to a warm start"),
    "rounds": (lambda g, o: dict(init=g, block=8, warm_rounds=0), ValueError,
               r"'warm_rounds' parameter of regroup_pattern must be an int in \[1, 1000\]"),
    "fixed_row_perm": (lambda g, o: dict(init=g, block=8, row_perm=np.zeros(32, np.intp)),
                       ValueError, "'row_perm' parameter of regroup_pattern is an ordering "
                       "that is not a permutation"),
    "anneal_fixed_rows": (lambda g, o: dict(init=g, block=8, anneal=1.0,
                                            row_perm=np.arange(32)), ValueError,
                          "'anneal' parameter of regroup_pattern moves rows, which row_perm "
                          "fixes"),
    "nm": (lambda g, o: dict(init=g, format="nm"), ValueError,
           "'init' parameter of regroup_pattern applies to the grid and shuffled formats"),
}


@pytest.mark.parametrize("case", sorted(WARM_ERRORS))
def test_warm_start_errors(case, warm_case):
    p, grid, other = warm_case
    make, kind, match = WARM_ERRORS[case]
    with pytest.raises(kind, match=match):
        regroup_pattern(p, **make(grid, other))


def test_the_dst_core_does_not_load_torch():
    code = "import sys, regroup.dst; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"



# -- one update (update_layout) ---------------------------------------------------------------
def _reference_update(W, G, layout, d, relayout_on, rounds):
    """update_layout written out from the public pieces, one full-size array at a time:
    what RegroupDST's update did before it was fused (the oracle)."""
    old = layout_mask(layout) if isinstance(layout, Layout) else \
        np.asarray(layout.mask2d, bool)
    W = W * old
    units, kept = layout_units(layout, rank=G if layout.format == "shuffled" else None)
    k = int(kept.sum())
    n = drop_count(k, d) if k < units.n_units else 0
    dg = drop_grow(unit_scores(W, units), unit_scores(G, units), kept, n)
    cur = units_layout(units, dg.kept, unit_scores(W, units, power=1))
    mask, done, ok = layout_mask(cur), cur, None
    if relayout_on and k < units.n_units:
        carried, fresh = mask & old, mask & ~old
        if fresh.any():
            g_ref = np.abs(G)[fresh].mean()
        else:
            per = unit_scores(G, units, power=1) / units.area()
            g_ref = per[~dg.kept].max() if (~dg.kept).any() else 0.0
        w_ref = np.abs(W[carried]).mean() if carried.any() else 0.0
        V = np.where(carried, np.abs(W), (w_ref / g_ref if g_ref > 0 else 0.0) * np.abs(G))
        V = V ** 2
        ok = False
        if V.any():
            lay = relayout(V, cur, k, rounds=rounds)
            new = layout_mask(lay)
            if lay.kept_blocks == k and V[new].sum() > V[mask].sum() * (1 + RTOL) \
                    and churn(old, new, W ** 2) <= d * (1 + RTOL):
                done, ok = lay, True
    return done, ok, churn(old, layout_mask(done), W ** 2)


@st.composite
def update_cases(draw):
    """A layout (regroup's, or random orders and kept units: rows in any order within
    a panel, blocks that need not divide the shape) with weights of a wide range."""
    n, m = draw(st.integers(4, 36)), draw(st.integers(4, 36))
    fmt = draw(st.sampled_from(["grid", "shuffled"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        layout = regroup_pattern(_pattern(rng, n, m, 0.4), block=4, format=fmt,
                                 budget=f"blocks={draw(st.integers(1, 6))}")
    else:
        block = (draw(st.integers(1, min(n, 5))), draw(st.integers(1, min(m, 5))))
        units = make_units((n, m), block, fmt, row_perm=rng.permutation(n),
                           col_perm=rng.permutation(m) if fmt == "grid" else None)
        kept = rng.random(units.table_shape) < draw(st.floats(0.05, 0.6))
        kept.flat[rng.integers(kept.size)] = True
        layout = units_layout(units, kept, np.zeros(units.table_shape))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = 10.0 ** rng.uniform(-8, 2, (n, m))
    W = (rng.standard_normal((n, m)) * scale).astype(dtype)
    G = (rng.standard_normal((n, m)) * scale[::-1, ::-1]).astype(dtype)
    return layout, W, G


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update_cases(), st.floats(0.0, 0.5), st.booleans(), st.integers(0, 2))
def test_update_layout_is_drop_grow_then_an_accepted_relayout(case, d, on, rounds):
    layout, W, G = case
    out = update_layout(W, G, layout, d, relayout=on, rounds=rounds)
    want, ok, c = _reference_update(W.astype(float), G.astype(float), layout, d, on, rounds)
    # the same layout, to the bit (its kept mass included), and the same decisions
    np.testing.assert_array_equal(out.mask, layout_mask(want))
    np.testing.assert_array_equal(out.mask, layout_mask(out.layout))
    np.testing.assert_array_equal(out.layout.row_perm, want.row_perm)
    assert out.layout.kept_mass == want.kept_mass
    assert out.relayout == ok and out.churn == c
    k_kept = int(layout.kept_blocks if isinstance(layout, Layout)
                 else layout.metrics["kept_blocks"])
    assert out.kept == k_kept == out.layout.kept_blocks
    assert out.dropped == out.grown and out.churn <= d * (1 + RTOL)
    if not on:
        assert out.relayout is None and out.note is None


def test_update_layout_sums_a_panel_in_its_row_order():
    # Rows 2, 0, 1 make one panel. Column 0 holds 9e-9 + 1 + 9e-9, which rounds
    # differently in the row order (1 + 9e-9 + 9e-9) than in the panel's (9e-9 + 1 +
    # 9e-9): against column 1's 1.0 the drop depends on the last bit.
    u = make_units((3, 3), (3, 1), "grid", row_perm=[2, 0, 1])
    lay = units_layout(u, np.array([[True, True, False]]), np.zeros((1, 3)))
    W = np.array([[9e-9, 1.0, 0], [1.0, 0, 0], [9e-9, 0, 0]])
    G = np.array([[0, 0, 1.0]] * 3)
    out = update_layout(W, G, lay, 0.5)
    want, _, _ = _reference_update(W, G, lay, 0.5, False, 1)
    np.testing.assert_array_equal(out.mask, layout_mask(want))
    assert out.layout.kept_mass == want.kept_mass


def test_update_layout_hand_made_drop_and_grow():
    # Three 2x2 units of a 2x6 grid, the left two kept. A drop fraction of 1/2 trades
    # one: the weak unit (left) goes, the unit of most gradient (right) comes.
    layout = regroup_pattern(from_array(np.array([[1., 1, 1, 1, 0, 0]] * 2)), block=2,
                             format="grid", method="identity", budget="blocks=2")
    W = np.array([[0.1, -0.1, 2, 2, 9, 9], [0.1, 0.1, 2, 2, 9, 9]])  # 9s: outside, ignored
    G = np.array([[0., 0, 0, 0, 5, 5], [0, 0, 0, 0, 5, 5]])
    out = update_layout(W, G, layout, 0.5)
    np.testing.assert_array_equal(out.mask, [[0, 0, 1, 1, 1, 1]] * 2)
    assert (out.kept, out.dropped, out.grown) == (2, 1, 1)
    assert out.churn == pytest.approx(0.04 / 16.04)
    same = update_layout(W, G, layout, 0.4)                 # drop_count(2, 0.4) = 0
    np.testing.assert_array_equal(same.mask, layout.mask2d)
    assert same.churn == 0.0 and same.dropped == 0


def test_update_layout_leaves_a_full_layout_and_ignores_weights_outside():
    rng = np.random.default_rng(5)
    full = regroup_pattern(from_array(rng.random((8, 8)) + 0.1), block=4,
                           format="shuffled", budget="blocks=4", objective="magnitude")
    out = update_layout(rng.random((8, 8)), rng.random((8, 8)), full, 0.3, relayout=True)
    assert (out.dropped, out.relayout) == (0, None)
    np.testing.assert_array_equal(out.mask, full.mask2d)
    part = regroup_pattern(_pattern(rng, 16, 16, 0.3), block=4, budget="blocks=3")
    W = rng.standard_normal((16, 16))
    W_nan = np.where(part.mask2d, W, np.nan)               # NaN only where nothing is kept
    G = rng.standard_normal((16, 16))
    a = update_layout(W, G, part, 0.4, relayout=True)
    b = update_layout(W_nan, G, part, 0.4, relayout=True)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.churn == b.churn


def _not_whole(layout):
    bad = dataclasses.replace(layout, mask=layout.mask.copy())
    bad.mask.reshape(-1)[np.flatnonzero(bad.mask)[0]] = False
    return bad


@pytest.mark.parametrize("case, change, exc, match", [
    ("grad_nan", dict(G=np.full((16, 16), np.nan)), ValueError,
     "'grad' parameter of update_layout must be finite"),
    ("weight_nan", dict(W="nan_inside"), ValueError,
     "'weight' parameter of update_layout must be finite"),
    ("shape", dict(W=np.ones((16, 8))), ValueError, "must have the layout's shape"),
    ("complex", dict(G=np.ones((16, 16), complex)), TypeError, "real numeric array"),
    ("fraction", dict(d=1.5), ValueError, "'fraction' parameter of update_layout"),
    ("rounds", dict(rounds=-1), ValueError, "'rounds' parameter of update_layout"),
    ("layout", dict(layout="grid"), TypeError, "'layout' parameter of update_layout"),
    ("not_whole", dict(layout=_not_whole), RegroupError, "not a union of whole units"),
    ("panel_cols", dict(layout="dup"), ValueError, "lists a column twice"),
    ("panel_col_range", dict(layout="outside"), ValueError,
     r"lists something other than columns in \[0, 16\)"),
    ("block_too_big", dict(layout="big"), ValueError,
     "must have a block_shape that fits its shape"),
    ("block_bad", dict(layout="zero"), ValueError, "must have a valid block_shape"),
    ("grad_shape", dict(G=np.ones((8, 16))), ValueError,
     "'grad' parameter of update_layout must have the layout's shape"),
    ("relayout", dict(relayout="no"), TypeError, "'relayout' parameter of update_layout"),
])
def test_update_layout_refuses_hostile_input(case, change, exc, match):
    rng = np.random.default_rng(0)
    lay = regroup_pattern(_pattern(rng, 16, 16, 0.3), block=4, format="shuffled",
                          budget="blocks=3")
    args = {"W": rng.standard_normal((16, 16)), "G": rng.standard_normal((16, 16)),
            "layout": lay, "d": 0.3, "rounds": 1, "relayout": True, **change}
    if isinstance(args["W"], str):
        args["W"] = np.where(lay.mask2d, np.nan, 1.0)
    if callable(args["layout"]):
        args["layout"] = args["layout"](lay)
    elif args["layout"] in ("dup", "outside"):
        # a Layout (no mask to fall back on): its columns are read before any mask
        units, kept = layout_units(lay)
        bad = units_layout(units, kept, np.zeros(units.table_shape))
        cols = [np.asarray(c) for c in bad.panel_cols]
        p = next(i for i, c in enumerate(cols) if c.size)
        cols[p] = np.concatenate([cols[p][:-1], [cols[p][0] if args["layout"] == "dup"
                                                 else 99]])
        args["layout"] = dataclasses.replace(bad, panel_cols=tuple(cols))
    elif args["layout"] in ("big", "zero"):
        args["layout"] = dataclasses.replace(
            lay, block_shape=(4, 32) if args["layout"] == "big" else (0, 4))
    with pytest.raises(exc, match=match):
        update_layout(args["W"], args["G"], args["layout"], args["d"],
                      relayout=args["relayout"], rounds=args["rounds"])
