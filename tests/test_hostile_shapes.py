"""Hostile shapes and hangs (issue 15): tall and thin matrices in bounded time and memory,
dask schedulers that never answer or answer garbage, workers that never import from the
current directory (also the Python 3.10 way) and die with their parent.

The bounded cases run in a child process under ``RLIMIT_AS`` and a timeout, and the child
reports its own peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import squareform

import regroup.partitioners._panels as panels
import regroup.partitioners.dsb as dsb_module
import regroup.partitioners.hierarchical as hier_module
import regroup.refine as refine_module
import regroup.similarity as S
from regroup import RegroupError, regroup_file, regroup_pattern
from regroup.assignment import assign, assign_within
from regroup.blocks import Budget, build_layout
from regroup.executors import _isolated_interpreters, connect_scheduler, execute
from regroup.partitioners._panels import labels_to_perm
from regroup.partitioners.metis import metis
from regroup.pattern import from_sparse

from .conftest import EXAMPLE, child_pids, kill_parent, process_alive, tcp_server

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
# Started as the console script is: without the current directory on its path.
_CLI = [sys.executable, "-c", "import sys; sys.path.pop(0); from regroup.cli import main; "
        "sys.exit(main())"]


def _limited(address_space: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return apply


def _random(n: int, m: int, density: float, seed: int = 0) -> sp.csr_matrix:
    X = sp.random(n, m, density=density, format="csr", random_state=np.random.default_rng(seed))
    X.data[:] = 1.0
    return X


def _planted(n: int, m: int, groups: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows drawn from ``groups`` column patterns with 1 % noise, and each row's group."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, n)
    base = rng.random((groups, m)) < 0.08
    return sp.csr_matrix((base[group] ^ (rng.random((n, m)) < 0.01)).astype(float)), group


# -- tall and thin patterns: bounded time and memory ---------------------------------------
_BOUNDED_CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np, scipy.sparse as sp
from regroup import regroup_pattern
from regroup.pattern import from_sparse
n, m = int(sys.argv[1]), int(sys.argv[2])
X = sp.random(n, m, density=0.3, format="csr", random_state=np.random.default_rng(0))
X.data[:] = 1.0
warnings.simplefilter("ignore")
t = time.perf_counter()
r = regroup_pattern(from_sparse(X, name="tall"), block=16, method="auto")
print(json.dumps({"seconds": time.perf_counter() - t, "metrics": r.metrics,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.parametrize("shape, side", [((65536, 20), "rows"), ((20, 65536), "cols")],
                         ids=["65536x20", "20x65536"])
def test_tall_and_thin_patterns_finish_in_bounded_time_and_memory(shape, side):
    # Before: 65536x20 ran > 600 s and 7 GB (rows x rows similarity, rows x panels
    # refinement); 20x65536 died on a 2 GiB (columns x groups) table.
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _BOUNDED_CHILD, *map(str, shape)],
                          capture_output=True, text=True, timeout=90, cwd=ROOT,
                          preexec_fn=_limited(int(1.5 * GIB)))
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rss"] < GIB, out["rss"]
    assert wall < 60 and out["seconds"] < 45, (wall, out["seconds"])
    m = out["metrics"]
    assert m["retained"] >= m["retained_identity"]
    n_items = shape[0] if side == "rows" else shape[1]
    k = n_items // 16
    assert m["bounds"] == [
        f"refine: the {side} step is left out: {n_items} {side} x {k} "
        f"{'row panels' if side == 'rows' else 'column groups'} = {n_items * k} cells, above "
        f"the limit of {refine_module.MAX_STEP_CELLS} (regroup.refine.MAX_STEP_CELLS)"]
    if side == "rows":
        # Size bounds are recorded, never silent: hierarchical refused by name, METIS on an
        # approximate kNN graph said in the layer's warnings.
        assert set(m["failed"]) == {"hierarchical", "hierarchical:linkage=complete"}
        assert all(f"limited to {hier_module.MAX_ROWS} rows" in v for v in m["failed"].values())
        for cand in ("metis", "metis:graph=jaccard"):
            assert any("approximate kNN" in w for w in m["warnings"][cand]), m["warnings"]


def test_a_matrix_narrower_than_the_block_is_skipped_with_its_reason(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", ok=rng.random((64, 96)) < 0.2,
             tall=rng.random((4096, 8)) < 0.3, wide=rng.random((8, 4096)) < 0.3)
    run = regroup_file(tmp_path / "m.npz", block=16, method="auto")
    assert [r["name"] for r in run.records] == ["ok"]
    assert dict(run.skipped) == {"tall": "matrix 4096x8 is smaller than the block 16x16",
                                 "wide": "matrix 8x4096 is smaller than the block 16x16"}


def test_a_single_thin_smtx_ends_in_exit_1_naming_the_reason(tmp_path):
    from regroup.io import write_smtx
    write_smtx(_random(65536, 1, 0.3), tmp_path / "thin.smtx")
    proc = subprocess.run(_CLI + ["run", str(tmp_path / "thin.smtx"), "-q", "-o",
                                  str(tmp_path / "r.npz")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          preexec_fn=_limited(GIB))
    assert proc.returncode == 1, proc.stderr
    assert "no usable layer: thin: matrix 65536x1 is smaller than the block 32x32" in proc.stderr
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("shape", ["1000000000 1", "1 1000000000", "16777217 2"])
def test_a_huge_declared_mtx_side_is_refused_before_its_index_is_built(tmp_path, shape):
    # Before: a 60-byte 1e9x1 .mtx allocated a 4-8 GB row index (MemoryError, exit 70).
    path = tmp_path / "tall.mtx"
    path.write_text(f"%%MatrixMarket matrix coordinate pattern general\n{shape} 2\n1 1\n1 1\n")
    proc = subprocess.run(_CLI + ["run", str(path), "-q", "-o", str(tmp_path / "r.npz")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          preexec_fn=_limited(GIB))
    assert proc.returncode == 1, proc.stderr
    n, m = shape.split()
    assert (f"tall.mtx:2: declared shape {n}x{m} has a side longer than 16777216 "
            "(regroup.io.mtx.MAX_SIDE)") in proc.stderr


def test_the_bounds_of_a_tall_pattern_are_recorded_in_its_metrics(monkeypatch):
    # The same bounds as at 65536 rows, lowered so that the case is small.
    monkeypatch.setattr(S, "DENSE_LIMIT", 100)
    monkeypatch.setattr(S, "EXACT_KNN_ROWS", 200)
    monkeypatch.setattr(hier_module, "MAX_ROWS", 200)
    monkeypatch.setattr(refine_module, "MAX_STEP_CELLS", 2000)
    pat = from_sparse(_random(400, 12, 0.3), name="tall")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = regroup_pattern(pat, block=4, method="auto")
        again = regroup_pattern(pat, block=4, method="auto")
    m = r.metrics
    assert m["bounds"] == ["refine: the rows step is left out: 400 rows x 100 row panels = "
                           "40000 cells, above the limit of 2000 (regroup.refine.MAX_STEP_CELLS)"]
    assert "limited to 200 rows" in m["failed"]["hierarchical"]
    assert any("400 rows are more than 200" in w for w in m["warnings"]["metis"])
    assert m["retained"] >= m["retained_identity"]
    np.testing.assert_array_equal(r.row_perm, again.row_perm)    # deterministic
    np.testing.assert_array_equal(r.col_perm, again.col_perm)


# -- similarity: never rows x rows for many rows -------------------------------------------
@pytest.mark.parametrize("fn", [S.shared_counts, S.jaccard])
def test_dense_similarity_refuses_more_rows_than_its_limit(fn):
    X = _random(S.MAX_DENSE_ROWS + 1, 3, 0.5)
    with pytest.raises(ValueError, match=f"dense {S.MAX_DENSE_ROWS + 1}x{S.MAX_DENSE_ROWS + 1}"
                                         f" array; it is limited to {S.MAX_DENSE_ROWS} rows"):
        fn(X)


@pytest.mark.parametrize("density", [0.02, 0.4])          # sparse and dense BLAS paths
def test_condensed_distances_equal_the_dense_ones_bit_for_bit(density):
    X = _random(301, 57, density, seed=3)
    X.data = np.random.default_rng(1).integers(1, 4, X.nnz).astype(float)   # counts
    ref = squareform(np.clip(1.0 - S.jaccard(X), 0.0, None), checks=False)
    np.testing.assert_array_equal(S.condensed_distance(X, block_rows=37), ref)
    np.testing.assert_array_equal(dsb_module.condensed_cosine_distance(X),
                                  squareform(dsb_module.cosine_distance(X), checks=False))


def test_hierarchical_and_dsb_above_the_dense_limit_order_rows_as_below(monkeypatch):
    X = _random(260, 40, 0.15, seed=5)
    ref_h = hier_module.hierarchical(X, 8, linkage="complete")
    ref_d = dsb_module.dsb(X, 8)
    monkeypatch.setattr(hier_module, "DENSE_LIMIT", 50)     # the condensed, blockwise path
    monkeypatch.setattr(dsb_module, "DENSE_LIMIT", 50)
    monkeypatch.setattr(S, "_CONDENSED_BLOCK_ELEMS", 260 * 16)
    np.testing.assert_array_equal(hier_module.hierarchical(X, 8, linkage="complete"), ref_h)
    np.testing.assert_array_equal(dsb_module.dsb(X, 8), ref_d)


def test_hierarchical_refuses_more_rows_than_its_limit_by_name():
    from regroup.validation import PartitionerError
    with pytest.raises(PartitionerError, match=f"limited to {hier_module.MAX_ROWS} rows "
                       r"\(regroup.partitioners.hierarchical.MAX_ROWS; got 8193\)"):
        hier_module.hierarchical(_random(8193, 4, 0.5), 16)


def test_approximate_knn_finds_planted_neighbours_and_says_so():
    X, group = _planted(S.EXACT_KNN_ROWS + 800, 300, 120)
    with pytest.warns(RuntimeWarning, match=f"{X.shape[0]} rows are more than "
                      f"{S.EXACT_KNN_ROWS} .*\\(approximate kNN\\)"):
        G = S.knn_similarity(X, 16)
    assert (G != G.T).nnz == 0 and G.diagonal().sum() == 0 and (G.data > 0).all()
    coo = G.tocoo()
    assert np.mean(group[coo.row] == group[coo.col]) > 0.95
    # Every row found neighbours; none kept more than k of its own (plus the reverse ones).
    assert (np.diff(G.indptr) >= 8).all()
    # The values are the exact similarities of the pairs kept.
    d = X[coo.row[:500]].multiply(X[coo.col[:500]]).sum(axis=1)
    np.testing.assert_array_equal(np.asarray(d).ravel(), coo.data[:500])


@pytest.mark.parametrize("metric", ["shared", "jaccard"])
def test_approximate_knn_keeps_most_of_the_exact_graph(metric):
    X, group = _planted(3000, 200, 60, seed=2)
    exact = S.knn_similarity(X, 16, metric=metric, approximate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # asked for: no warning
        approx = S.knn_similarity(X, 16, metric=metric, approximate=True)
    # Measured: 0.91 (shared) and 0.85 (jaccard) of the exact graph's weight, 0.99 of its
    # edges inside a planted group.
    assert approx.sum() >= 0.8 * exact.sum()
    coo = approx.tocoo()
    assert np.mean(group[coo.row] == group[coo.col]) > 0.95
    assert approx.nnz <= 2 * 16 * X.shape[0]


def test_approximate_knn_is_linear_in_the_rows():
    def peak(n: int) -> int:
        import tracemalloc
        X = _random(n, 20, 0.3)
        tracemalloc.start()
        S.knn_similarity(X, 64, approximate=True)
        out = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out
    small, large = peak(8192), peak(32768)
    assert large < 6 * small, (small, large)              # 4x the rows; rows^2 would be 16x
    assert large < 400 * 2**20


# -- refinement and panel repair: bounded tables and work ----------------------------------
def test_refine_leaves_out_a_step_above_the_cell_bound(monkeypatch):
    monkeypatch.setattr(refine_module, "MAX_STEP_CELLS", 100)
    V = _random(64, 48, 0.2, seed=4)
    start = build_layout(V, np.arange(64), np.arange(48), (4, 4), "grid", Budget.parse("iso"),
                         V.nnz)
    notes: list[str] = []
    out = refine_module.refine(V, start, Budget.parse("iso"), V.nnz, notes=notes)
    assert notes == ["refine: the rows step is left out: 64 rows x 16 row panels = 1024 "
                     "cells, above the limit of 100 (regroup.refine.MAX_STEP_CELLS)",
                     "refine: the cols step is left out: 48 cols x 12 column groups = 576 "
                     "cells, above the limit of 100 (regroup.refine.MAX_STEP_CELLS)"]
    np.testing.assert_array_equal(out.row_perm, start.row_perm)
    assert out.kept_mass >= start.kept_mass


def test_refine_stops_at_its_work_bound_and_says_so(monkeypatch):
    pat = from_sparse(_random(256, 64, 0.1, seed=6), name="x")
    full = regroup_pattern(pat, block=8, method="sort", refine=True)
    assert "bounds" not in full.metrics
    monkeypatch.setattr(refine_module, "REFINE_WORK", 50_000)
    cut = regroup_pattern(pat, block=8, method="sort", refine=True)
    again = regroup_pattern(pat, block=8, method="sort", refine=True)
    assert cut.metrics["bounds"] == ["refine: stopped when its work bound was spent (50000 "
                                     "cells visited by its assignments, "
                                     "regroup.refine.REFINE_WORK)"]
    np.testing.assert_array_equal(cut.row_perm, again.row_perm)   # counted, not timed
    assert cut.metrics["refine_gain"] >= 0                           # never below its start
    assert not np.array_equal(cut.row_perm, full.row_perm)


def test_the_joint_refinement_of_folded_orders_records_its_bounds(monkeypatch):
    """Fold mode refines shared orders with refine_shared: its bounds reach every layer
    sharing them, as refine's own do."""
    pytest.importorskip("torch")
    from regroup.adapters.torch import regroup_model
    from tests.torch_zoo import pruned
    model, x = pruned("mlp")
    # chain=None: the chain would plan the layers again, past the joint refinement
    plan = regroup_model(model, example_inputs=(x,), block=8, method="sort",
                         refine=True, chain=None)
    assert plan.folds and all("bounds" not in r.metrics for r in plan.layers.values())
    monkeypatch.setattr(refine_module, "MAX_STEP_CELLS", 10)
    model, x = pruned("mlp")
    plan = regroup_model(model, example_inputs=(x,), block=8, method="sort", refine=True,
                         chain=None)
    shared = [r.metrics.get("bounds", []) for r in plan.layers.values()]
    assert shared and all(any(b.startswith("refine_shared: order ") and
                              "above the limit of 10" in b for b in bounds)
                          for bounds in shared), shared


@pytest.mark.parametrize("fmt, block", [("grid", 1), ("shuffled", 2), ("grid", (1, 2))])
def test_block_tables_beyond_the_limit_are_refused_before_any_work(fmt, block):
    """1x1 blocks over 8192 x 8192 made 67M candidate blocks: 3.3 GB and 21 s with the
    cheapest method. Refused at once, naming the limit."""
    pat = from_sparse(_random(8192, 8192, 0.0005, seed=3), name="wide")
    t0 = time.perf_counter()
    with pytest.raises(RegroupError, match=r"candidate blocks, above the limit of 16777216 "
                                           r"\(regroup\.blocks\.MAX_TABLE_CELLS\)"):
        regroup_pattern(pat, block=block, format=fmt, method="sort")
    assert time.perf_counter() - t0 < 2
    # At the limit it runs: 4096 x 4096 at 1x1 is 2**24 cells.
    small = from_sparse(_random(4096, 4096, 0.0005, seed=3), name="ok")
    r = regroup_pattern(small, block=1, method="sort")
    assert r.metrics["retained"] == 1.0          # 1x1 blocks keep every nonzero at iso


def test_assign_within_stops_early_and_never_loses():
    rng = np.random.default_rng(0)
    values = rng.random((600, 60))
    start = np.arange(600)

    def total(perm):
        return values[perm, np.arange(600) // 10].sum()
    exact = assign(values, 10, start=start)
    done = assign_within(values, 10, start=start)
    assert done.optimal and np.array_equal(done.perm, exact)
    cut = assign_within(values, 10, start=start, work_limit=3 * 600 * 60)
    assert not cut.optimal and cut.work >= 3 * 600 * 60
    assert total(start) <= total(cut.perm) < total(exact)
    assert np.array_equal(np.sort(cut.perm), start)


def test_panel_repair_without_room_for_affinities_fills_parts_in_order(monkeypatch):
    X = _random(300, 30, 0.2)
    labels = np.zeros(300, np.intp)
    labels[:10] = np.arange(10)            # part 0 holds 291 rows for 10 places
    monkeypatch.setattr(panels, "AFFINITY_CELLS", 100)
    with pytest.warns(RuntimeWarning, match=r"281 rows overflow their parts; 281 x 30 "
                                            "affinities are more than 100"):
        perm = labels_to_perm(labels, 10, X, who="tool")
    assert np.array_equal(np.sort(perm), np.arange(300))
    # Part 0 keeps its 10 best attached rows (first slot); the 281 others fill parts 1..29
    # in index order, as the affinity placement does when every affinity is 0.
    stay = perm[:10]
    assert set(labels[stay]) == {0}
    moved = [i for i in perm[10:] if i not in set(range(1, 10))]
    assert moved == sorted(moved) and len(moved) == 281
    monkeypatch.setattr(panels, "AFFINITY_CELLS", 1 << 24)
    np.testing.assert_array_equal(labels_to_perm(labels, 10, X, who="tool")[:10], stay)


def test_metis_keeps_panels_of_one_row_in_natural_order(capfd):
    pytest.importorskip("pymetis")
    perm = metis(_random(3000, 2, 0.5), 1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(perm, np.arange(3000))
    assert capfd.readouterr().out == ""    # METIS asked for n parts printed to stdout


# -- dask: a scheduler that never answers, or answers garbage ------------------------------
_GARBAGE = {
    "silent": None,
    "bytes": b"\xff" * 4096,
    "4-EiB-frame": struct.pack("<Q", 1 << 62) + b"\x00" * 64,
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("kind", list(_GARBAGE))
def test_a_scheduler_that_does_not_speak_dask_fails_within_seconds(kind):
    pytest.importorskip("distributed")
    import dask
    with tcp_server(_GARBAGE[kind]) as address, \
            dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(RegroupError, match=f"m.npz: .*dask scheduler '{address}'"):
            connect_scheduler(address, "m.npz")
        assert time.monotonic() - t0 < 8


def test_the_cli_names_a_silent_scheduler_with_exit_1(tmp_path):
    pytest.importorskip("distributed")
    (tmp_path / "ex.npz").write_bytes(EXAMPLE.read_bytes())
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    with tcp_server(None) as address:
        t0 = time.monotonic()
        proc = subprocess.run(_CLI + ["run", "ex.npz", "-q", "--engine", "dask",
                                      "--scheduler", address, "-o", "r.npz"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env=env)
        wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr           # before: > 200 s, or exit 2 / 70
    assert f"ex.npz: dask scheduler '{address}' did not answer within 1 s" in proc.stderr
    assert wall < 30
    assert not (tmp_path / "r.npz").exists()


# -- workers: never from the current directory, never outliving the parent ----------------
_POOL_CHILD = r"""
import sys
sys.path.pop(0)
import concurrent.futures as cf, contextlib, multiprocessing as mp, os
from regroup.executors import _isolated_interpreters
if __name__ == "__main__":
    guard = _isolated_interpreters() if sys.argv[1] == "isolated" else contextlib.nullcontext()
    with guard:
        with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
            print(ex.submit(os.getcwd).result())
"""


@pytest.mark.parametrize("mode", ["isolated", "plain"])
def test_spawned_workers_in_isolated_mode_never_import_from_the_cwd(tmp_path, mode):
    # Python 3.10 has no PYTHONSAFEPATH: there regroup starts multiprocessing's
    # interpreters with -I (the same mechanism, checked here on any version; "plain" is the
    # control showing that a spawned worker would otherwise run ./pickle.py).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran"
    for name in ("pickle.py", "socket.py", "json.py"):
        (cwd / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _POOL_CHILD, mode], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    if mode == "isolated":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not marker.exists(), marker.read_text()
        assert proc.stdout.split()[-1] == str(cwd)       # workers still work in the cwd
    else:
        assert marker.exists() and "pickle.py" in marker.read_text()


def test_old_pythons_spawn_with_isolated_flags():
    import multiprocessing.spawn as mp_spawn
    plain = mp_spawn.get_command_line(pipe_handle=3)
    with _isolated_interpreters():
        isolated = mp_spawn.get_command_line(pipe_handle=3)
    assert "-I" not in plain[:plain.index("-c")]
    assert isolated[:isolated.index("-c")].count("-I") == 1
    assert mp_spawn.get_command_line(pipe_handle=3) == plain       # restored


def test_a_task_error_is_named_without_add_note():
    class NoteLess(KeyError):           # as every exception is on Python 3.10
        @property
        def add_note(self):
            raise AttributeError("add_note")

    def fail(x):
        raise NoteLess(x)
    with pytest.raises(NoteLess) as info:
        list(execute(fail, [(1,)], labels=["fc1.weight"], where="m.npz"))
    assert info.value.__notes__ == ["m.npz: while regrouping layer 'fc1.weight'"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dask_local_workers_die_with_their_parent(tmp_path):
    pytest.importorskip("distributed")
    (tmp_path / "ex.npz").write_bytes(EXAMPLE.read_bytes())
    proc = subprocess.Popen(_CLI + ["run", "ex.npz", "--block", "16", "-q", "--anneal", "60",
                                    "--engine", "dask", "--jobs", "2", "-o", "r.npz"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.3)
            workers = [p for p in child_pids(proc.pid)
                       if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert len(workers) >= 2, "the dask workers never started"
        time.sleep(3.0)                   # inside a layer
        assert not kill_parent(proc, child_pids(proc.pid), 15)
    finally:
        for p in [proc.pid, *workers]:
            if process_alive(p):
                os.kill(p, signal.SIGKILL)
