"""One contract for every registered partitioner, plus oracles on planted structure."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from regroup import PartitionerError, RegroupError, from_array, regroup_pattern
from regroup.partitioners import (available_partitioners, get_partitioner, list_partitioners,
                                  parse_method, run_partitioner)
from regroup.partitioners._panels import labels_to_perm
from regroup.synthetic import planted_weights

DIRECT = [n for n in list_partitioners() if get_partitioner(n).func is not None]
# Random matrices are where DSB degenerates; test_baselines checks that it says so.
pytestmark = pytest.mark.filterwarnings(
    "ignore::regroup.partitioners.dsb.DSBDegenerateWarning")


def _require(name):
    for mod in get_partitioner(name).requires:
        pytest.importorskip(mod)


def _run(name, X, size, seed):
    cname, params = parse_method(name)
    return run_partitioner(cname, params, sp.csr_matrix(X), size,
                           np.random.default_rng(seed), None)


def _panels(perm, size):
    return {frozenset(perm[i:i + size].tolist()) for i in range(0, len(perm), size)}


@pytest.mark.parametrize("name", DIRECT)
@pytest.mark.parametrize("n,size", [(64, 16), (70, 16), (5, 8)])
def test_contract_valid_permutation(name, n, size):
    _require(name)
    X = sp.random(n, 48, density=0.15, random_state=n, format="csr")
    perm = _run(name, X, size, seed=0)
    assert perm.dtype == np.intp and sorted(perm.tolist()) == list(range(n))


@pytest.mark.parametrize("name", [n for n in DIRECT if get_partitioner(n).deterministic])
def test_contract_same_seed_same_result(name):
    _require(name)
    X = sp.random(96, 64, density=0.1, random_state=7, format="csr")
    np.testing.assert_array_equal(_run(name, X, 16, 3), _run(name, X, 16, 3))


@pytest.mark.parametrize("name", DIRECT)
@pytest.mark.parametrize("bad,why", [(np.nan, "NaN"), (np.inf, "infinite"),
                                     (-1.0, "negative")])
def test_contract_partitioners_refuse_values_they_cannot_score(name, bad, why):
    _require(name)
    X = sp.random(40, 30, density=0.2, random_state=1, format="csr")
    X.data[3] = bad
    with pytest.raises(ValueError, match=f"partitioner {name!r}.*{why}"):
        _run(name, X, 8, seed=0)


@pytest.mark.parametrize("name", DIRECT)
def test_contract_partitioners_order_empty_and_dense_matrices(name):
    # Degenerate but valid inputs: every row looks alike, any ordering is a valid answer.
    _require(name)
    for X in (sp.csr_matrix((24, 16)), sp.csr_matrix(np.ones((24, 16)))):
        perm = _run(name, X, 8, seed=0)
        assert perm.dtype == np.intp and sorted(perm.tolist()) == list(range(24))


@pytest.mark.parametrize("name", list_partitioners())
def test_regroup_pattern_refuses_bad_patterns_before_partitioning(name):
    _require(name)
    with pytest.raises(RegroupError, match="empty"):
        regroup_pattern(from_array(np.zeros((32, 32))), method=name, block=8)
    with pytest.raises(RegroupError, match="fully dense"):
        regroup_pattern(from_array(np.ones((32, 32))), method=name, block=8)
    with pytest.raises(RegroupError, match="NaN"):
        regroup_pattern(from_array(np.full((32, 32), np.nan)), method=name, block=8)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="must be one of.*'hierarchical'.*'metis'"):
        parse_method("hmetis")
    with pytest.raises(ValueError, match="has no option 'k'; valid options: backend, linkage"):
        parse_method("hierarchical:k=3")
    with pytest.raises(ValueError, match="'linkage'.*must be one of"):
        parse_method("hierarchical:linkage=ward2")


def test_available_is_a_subset_without_importing(monkeypatch):
    import dataclasses
    import subprocess
    import sys

    from regroup.partitioners import registry

    assert set(available_partitioners()) <= set(list_partitioners())
    assert {"identity", "random", "sort", "hierarchical", "metis", "auto"} <= set(
        available_partitioners())
    # Availability is probed with find_spec: no backend library is imported to list them.
    code = ("import sys; from regroup.partitioners import available_partitioners; "
            "available_partitioners(); print(sorted(m for m in ('pymetis', 'kahypar', "
            "'mtkahypar', 'fastcluster', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    # A partitioner whose library is missing is registered but not available.
    spec = get_partitioner("sort")
    monkeypatch.setitem(registry._REGISTRY, "sort",
                        dataclasses.replace(spec, requires=("no_such_module_regroup",)))
    assert "sort" in list_partitioners() and "sort" not in available_partitioners()


@pytest.mark.parametrize("name", ["hierarchical", "hierarchical:linkage=complete", "metis",
                                  "metis:graph=jaccard"])
def test_planted_panels_are_recovered_exactly(name):
    # Each group of 16 rows uses its own 12 columns and nothing else: the optimum is known.
    rng = np.random.default_rng(0)
    groups, size = 6, 16
    X = np.zeros((groups * size, groups * 12))
    for g in range(groups):
        X[g * size:(g + 1) * size, g * 12:(g + 1) * 12] = rng.random((size, 12)) < 0.7
    hidden = rng.permutation(groups * size)
    perm = _run(name, X[hidden], size, seed=0)
    truth = {frozenset(np.flatnonzero(hidden // size == g).tolist()) for g in range(groups)}
    assert _panels(perm, size) == truth


def test_isolated_runs_tell_documented_failures_from_bugs():
    from regroup.partitioners._isolate import run_isolated
    from regroup.partitioners.hierarchical import MAX_ROWS
    pytest.importorskip("kahypar")
    assert get_partitioner("kahypar").isolated
    # A PartitionerError raised in the child is the partitioner's failure, as in-process.
    big = sp.random(MAX_ROWS + 1, 8, density=0.01, format="csr", random_state=0)
    with pytest.raises(PartitionerError, match="'hierarchical' failed in its subprocess.*"
                                               "limited to"):
        run_isolated("hierarchical", big, 32, {"linkage": "average", "backend": "scipy"},
                     0, 60)
    # Any other exception in the child is a bug: never turned into a failure auto skips.
    with pytest.raises(RuntimeError, match="'kahypar' raised ValueError.*not a failure its "
                                           "library documents"):
        run_isolated("kahypar", sp.random(50, 40, density=0.2, format="csr"), 10,
                     {"objective": "km1", "epsilon": "bad"}, 0, 60)


def test_time_limit_is_enforced():
    # A pattern large enough that hierarchical clustering cannot finish in 10 ms.
    X = sp.random(3000, 400, density=0.05, random_state=0, format="csr")
    from regroup.partitioners._isolate import run_isolated
    with pytest.raises(PartitionerError, match="exceeded its time limit of 0.01 s"):
        run_isolated("hierarchical", X, 32, {"linkage": "average", "backend": "scipy"}, 0,
                     0.01)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(1, 20), st.integers(1, 12), st.integers(0, 10**6))
def test_labels_to_perm_gives_exact_panels(n, size, k, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    X = sp.random(n, 10, density=0.3, random_state=seed % 1000, format="csr")
    perm = labels_to_perm(labels, size, X)
    assert sorted(perm.tolist()) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(0, 10**6))
def test_labels_to_perm_keeps_parts_that_already_fit(parts, size, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(parts), size))
    perm = labels_to_perm(labels, size)
    assert _panels(perm, size) == {frozenset(np.flatnonzero(labels == p).tolist())
                                   for p in range(parts)}


def test_planted_weights_grid_close_to_the_planted_layout():
    pl = planted_weights(256, 256, block=32, block_density=0.15, sparsity=0.9, contrast=8,
                         seed=2)
    pat = from_array(pl.weight)
    r = regroup_pattern(pat, method="auto", block=32)
    # The hidden layout's own retained at the same budget is the oracle here.
    from regroup.blocks import Budget, build_layout, layout_mask
    from regroup.metrics import retained
    oracle = retained(pat.binary(), layout_mask(build_layout(
        pat.matrix, pl.row_perm, pl.col_perm, (32, 32), "grid", Budget(), pat.nnz)))
    assert r.metrics["retained"] >= oracle - 0.05
    assert r.metrics["retained"] > 2 * r.metrics["retained_identity"]


@pytest.mark.filterwarnings("ignore:auto. candidate 'metis.graph=jaccard' failed")
def test_auto_survives_documented_failures_but_a_bug_surfaces(monkeypatch):
    import dataclasses

    from regroup.partitioners import registry

    def raising(exc):
        def func(X, size, *, rng, **params):
            raise exc
        return func

    pat = from_array(np.random.default_rng(0).random((48, 40)) < 0.2)
    spec = get_partitioner("metis")
    monkeypatch.setitem(registry._REGISTRY, "metis",
                        dataclasses.replace(spec, func=raising(RuntimeError("METIS ERROR"))))
    with pytest.warns(RuntimeWarning, match="candidate 'metis' failed.*METIS ERROR"):
        r = regroup_pattern(pat, block=8, method="auto")
    assert "metis" in r.metrics["failed"] and "metis" not in r.metrics["candidates"]
    with pytest.raises(PartitionerError, match="partitioner 'metis' failed: RuntimeError"):
        regroup_pattern(pat, block=8, method="metis")
    # An exception the library does not document is a bug in regroup: never swallowed.
    monkeypatch.setitem(registry._REGISTRY, "metis",
                        dataclasses.replace(spec, func=raising(IndexError("off by one"))))
    with pytest.raises(IndexError, match="off by one"):
        regroup_pattern(pat, block=8, method="auto")
