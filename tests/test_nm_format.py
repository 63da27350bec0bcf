"""format="nm" end to end: options, engine, pipeline, result files (hostile ones too), CLI.

An N:M layer is a column permutation plus the N:M mask of the permuted weight, stored in
original coordinates; these tests check what a user relies on: the stored mask is the
N:M mask of the stored permutation, it keeps at least plain N:M, files round-trip and
tampered ones are refused, options that do not apply are refused, not ignored.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regroup
from regroup import (FormatError, RegroupError, RegroupOptions, check_layout, from_array,
                     load_result, regroup_budgets, regroup_checkpoint, regroup_file,
                     regroup_pattern, save_result)
from regroup.cli import main
from regroup.compare import compare
from regroup.nm import check_nm_mask, nm_mask, nm_retained
from regroup.provenance import options_key
from regroup.sweep import sweep

from .conftest import EXAMPLE

NMS = [(2, 4), (1, 4), (4, 8), (2, 8)]


def _weights(seed: int, rows: int, cols: int, density: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0
    w[0, 0] = 1.0                      # never empty
    return w


@pytest.fixture
def small_npz(tmp_path) -> Path:
    """Two layers M divides (a Linear and a conv) and one whose 30 columns it does not."""
    conv = _weights(2, 16, 8 * 9).reshape(16, 8, 3, 3)
    path = tmp_path / "small.npz"
    np.savez(path, **{"a.weight": _weights(0, 24, 32), "b.weight": _weights(1, 24, 30),
                      "conv.weight": conv})
    return path


def _check_layer(r, w: np.ndarray, nm: tuple[int, int]) -> None:
    """What every N:M layer must satisfy, against its input weight ``w``."""
    n, m = nm
    A = np.abs(w.reshape(w.shape[0], -1)).astype(np.float64)
    rows, cols = A.shape
    assert r.format == "nm" and r.nm == nm and r.block_shape == (1, m)
    assert np.array_equal(np.sort(r.col_perm), np.arange(cols))
    assert np.array_equal(r.row_perm, np.arange(rows))
    # The stored mask is the N:M mask of the stored permutation, in original coordinates.
    assert np.array_equal(r.mask2d, nm_mask(A, nm, r.col_perm))
    kept = r.mask2d[:, r.col_perm].reshape(rows, -1, m).sum(-1)
    assert (kept == n).all()
    check_layout(r.mask2d, "nm", r.block_shape, r.row_perm, r.col_perm, nm=nm)
    met = r.metrics
    assert met["kept_area"] == rows * cols * n // m
    # Never below plain N:M in the objective (|w| here).
    assert nm_retained(A, nm, r.col_perm) >= nm_retained(A, nm) - 1e-9
    assert met["retained_magnitude"] >= met["retained_magnitude_identity"] - 1e-12
    assert met["retained_identity"] == pytest.approx(
        float(((A != 0) & nm_mask(A, nm)).sum() / (A != 0).sum()))


# -- options ------------------------------------------------------------------------------
def test_nm_options_normalise_and_round_trip_through_the_record():
    a, b = RegroupOptions(format="nm", nm="2:4"), RegroupOptions(format="nm", nm=(2, 4))
    assert a == b == RegroupOptions(format="nm")           # 2:4 is the default
    assert a.nm == (2, 4) and a.block == (1, 4) and a.method == "auto"
    rec = RegroupOptions(format="nm", nm=" 1 : 8 ", method="auto", seed=5).record()
    assert rec["nm"] == [1, 8] and rec["block"] == [1, 8] and rec["format"] == "nm"
    assert RegroupOptions.from_record(json.loads(json.dumps(rec))).nm == (1, 8)
    assert RegroupOptions.from_record(rec) == RegroupOptions(format="nm", nm="1:8", seed=5)
    # The block formats record no nm (their records, and result bytes, are unchanged).
    assert "nm" not in RegroupOptions().record()
    # Stale parts are not reused: the options key changes with nm.
    assert options_key(RegroupOptions(format="nm").record()) != \
        options_key(RegroupOptions(format="nm", nm="1:4").record())


@pytest.mark.parametrize("kwargs,param,got", [
    (dict(nm="2:4"), "nm", "None with format='grid'"),
    (dict(format="shuffled", nm=(1, 4)), "nm", "None with format='shuffled'"),
    (dict(format="nm", method="metis"), "method", "one of 'auto', 'asp' with format='nm'"),
    (dict(format="nm", method="identity"), "method", "one of 'auto', 'asp'"),
    (dict(method="asp"), "method", "a partitioner name with format='grid'"),
    (dict(format="nm", nm="4:8", method="asp"), "method", "'auto' with format='nm' nm=4:8"),
    (dict(format="nm", block=16), "block", "left at its default with format='nm'"),
    (dict(format="nm", nm="1:8", block="1x4"), "block", "left at its default"),
    (dict(format="nm", budget="density=0.5"), "budget", "'iso' \\(its default\\)"),
    (dict(format="nm", budget_scope="global"), "budget_scope", "'layer' \\(its default"),
    (dict(format="nm", layer_min=0.5), "layer_min", "0.0 \\(its default"),
    (dict(format="nm", refine=True), "refine", "None \\(its default"),
    (dict(format="nm", anneal=1.0), "anneal", "None \\(its default"),
    (dict(format="nm", edge="error"), "edge", "'partial' \\(its default"),
    (dict(format="nm", params={"graph": "jaccard"}), "params", "None with format='nm'"),
    (dict(format="nm", nm="4:4"), "nm", "None, or with format='nm' N:M"),
])
def test_options_that_do_not_fit_nm_are_refused_naming_them(kwargs, param, got):
    with pytest.raises(ValueError, match=rf"^The '{param}' parameter of RegroupOptions must "
                                         rf"be {got}.* Got .* instead"):
        RegroupOptions(**kwargs)


def test_errors_name_the_entry_point(tmp_path):
    with pytest.raises(ValueError, match="^The 'method' parameter of regroup_file must"):
        regroup_file(EXAMPLE, format="nm", method="sort")
    with pytest.raises(ValueError, match="^The 'format' parameter of regroup_budgets must "
                                         "be one of 'grid', 'shuffled'"):
        regroup_budgets(from_array(_weights(0, 8, 8)), "iso", format="nm")
    with pytest.raises(ValueError, match="^The 'format' parameter of sweep must be one of "
                                         "'grid', 'shuffled'"):
        sweep(EXAMPLE, format="nm", speed=False)
    with pytest.raises(ValueError, match="'row_perm' parameter of regroup_pattern applies "
                                         "to the grid and shuffled formats only"):
        regroup_pattern(from_array(_weights(0, 8, 8)), format="nm", row_perm=np.arange(8))


# -- one layer ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), nm=st.sampled_from(NMS), groups=st.integers(1, 6),
       rows=st.integers(1, 12), density=st.sampled_from([0.2, 0.5, 0.9]),
       method=st.sampled_from(["auto", "asp"]))
def test_every_nm_layer_is_the_nm_mask_of_its_permutation(seed, nm, groups, rows, density,
                                                          method):
    if method == "asp" and nm[1] > 4:
        method = "auto"
    w = _weights(seed, rows, groups * nm[1], density)
    if np.count_nonzero(w) == w.size:
        w[-1, -1] = 0
    r = regroup_pattern(from_array(w), format="nm", nm=nm, method=method, seed=seed % 7)
    _check_layer(r, w, nm)
    again = regroup_pattern(from_array(w), format="nm", nm=nm, method=method, seed=seed % 7)
    assert np.array_equal(again.col_perm, r.col_perm)             # deterministic per seed
    assert again.metrics == r.metrics


def test_a_pattern_without_weights_uses_the_count_objective():
    w = _weights(3, 32, 64, 0.4) != 0                              # a mask: no magnitudes
    r = regroup_pattern(from_array(w), format="nm", nm="1:4")
    assert r.metrics["objective"] == "count" and r.metrics["retained_magnitude"] is None
    assert np.array_equal(r.mask2d, nm_mask(w.astype(float), (1, 4), r.col_perm))
    assert r.metrics["retained"] > r.metrics["retained_identity"]   # measured: 0.54 vs 0.44
    with pytest.raises(RegroupError, match="objective 'magnitude' needs"):
        regroup_pattern(from_array(w), format="nm", objective="magnitude")


def test_the_search_beats_plain_and_efficacy_is_the_share_of_the_gap_closed():
    w = _weights(4, 64, 64, 0.6)
    A = np.abs(w).astype(np.float64)
    for method in ("auto", "asp"):
        r = regroup_pattern(from_array(w), format="nm", method=method)
        _check_layer(r, w, (2, 4))
        kept, plain = nm_retained(A, (2, 4), r.col_perm), nm_retained(A, (2, 4))
        ceiling = float(np.sort(A, axis=1)[:, -32:].sum())         # per-row top half
        assert kept > plain
        assert r.metrics["efficacy"] == pytest.approx((kept - plain) / (ceiling - plain))
        assert 0 < r.metrics["efficacy"] < 1
        assert r.metrics["chosen"] == {"auto": "nm_search", "asp": "asp_search"}[method]


def test_a_fixed_column_order_is_taken_as_given():
    w = _weights(5, 16, 32)
    perm = np.random.default_rng(0).permutation(32)
    r = regroup_pattern(from_array(w), format="nm", col_perm=perm)
    assert np.array_equal(r.col_perm, perm) and r.metrics["chosen"] == "fixed"
    assert np.array_equal(r.mask2d, nm_mask(np.abs(w), (2, 4), perm))


def test_a_search_cut_short_by_its_time_limit_still_gives_a_valid_layer():
    w = _weights(7, 64, 256, 0.7)
    r = regroup_pattern(from_array(w), format="nm", time_limit=1e-3)
    _check_layer(r, w, (2, 4))          # at worst plain N:M (the identity), never below
    assert RegroupOptions(format="nm", time_limit=1e-3).record()["time_limit"] == 1e-3


def test_columns_m_does_not_divide_are_refused_for_one_layer():
    with pytest.raises(RegroupError, match="N:M groups of 4 columns need a column count "
                                           "divisible by 4; the matrix is 24x30"):
        regroup_pattern(from_array(_weights(1, 24, 30)), format="nm")


# -- result files -------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), nm=st.sampled_from(NMS), groups=st.integers(1, 5),
       rows=st.integers(1, 6))
def test_check_nm_mask_accepts_nm_masks_and_refuses_one_kept_too_many(seed, nm, groups,
                                                                      rows):
    n, m = nm
    rng = np.random.default_rng(seed)
    A = rng.random((rows, groups * m))
    perm = rng.permutation(groups * m)
    mask = nm_mask(A, nm, perm)
    check_nm_mask(mask, nm, perm)
    r, g = rng.integers(rows), rng.integers(groups)
    cols = perm[g * m:(g + 1) * m]
    mask[r, cols[~mask[r, cols]][0]] = True                         # N+1 in that group
    with pytest.raises(RegroupError, match=f"keeps {n + 1} of the {m} columns"):
        check_nm_mask(mask, nm, perm)


@pytest.fixture
def saved(tmp_path):
    layers = [regroup_pattern(from_array(_weights(0, 24, 32), name="fc"), format="nm"),
              regroup_pattern(from_array(_weights(2, 16, 72).reshape(16, 8, 3, 3),
                                         name="conv"), format="nm", nm="1:4")]
    path = tmp_path / "r.npz"
    save_result(path, layers, {"options": RegroupOptions(format="nm").record()})
    return path, layers


def test_nm_results_round_trip(saved):
    path, layers = saved
    res = load_result(path)
    with zipfile.ZipFile(path) as z:     # no row order is stored: N:M keeps rows in place
        assert sorted(n for n in z.namelist() if n.startswith("layers/0/")) == [
            "layers/0/col_perm.npy", "layers/0/mask.npy"]
    for a in layers:
        b = res[a.name]
        assert b.format == "nm" and b.nm == a.nm and b.block_shape == a.block_shape
        assert b.mask.shape == a.shape and np.array_equal(b.mask, a.mask)
        assert np.array_equal(b.col_perm, a.col_perm)
        assert np.array_equal(b.row_perm, a.row_perm) and b.metrics == a.metrics
    assert RegroupOptions.from_record(res.meta["options"]) == RegroupOptions(format="nm")
    save_result(path.with_name("again.npz"), list(res.values()),
                {"options": RegroupOptions(format="nm").record()})
    assert path.with_name("again.npz").read_bytes() == path.read_bytes()


def _rewrite(src: Path, dst: Path, arrays: dict | None = None, meta=None) -> Path:
    """``src`` with some npy entries replaced by ``arrays`` and meta.json edited by
    ``meta(doc)``."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            if arrays and name in arrays:
                import io
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arrays[name], allow_pickle=False)
                data = buf.getvalue()
            if meta is not None and name == "meta.json":
                doc = json.loads(data)
                meta(doc)
                data = json.dumps(doc).encode()
            out.writestr(name, data)
    return dst


def _arrays(path: Path, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z[f"layers/{i}/mask"].copy(), z[f"layers/{i}/col_perm"].copy()


def test_an_untampered_rewrite_loads(saved, tmp_path):
    path, _ = saved                      # the rewriting helper alone breaks nothing
    mask, perm = _arrays(path)
    out = _rewrite(path, tmp_path / "same.npz", {"layers/0/mask.npy": mask,
                                                 "layers/0/col_perm.npy": perm})
    assert np.array_equal(load_result(out)["fc"].mask, mask)


def _tampers(path: Path):
    mask, perm = _arrays(path)
    dup = perm.copy()
    dup[1] = dup[0]
    extra = mask.copy()
    g = perm[:4]                                      # row 0, first group: keep 3 of 4
    extra[0, g[~extra[0, g]][0]] = True
    fewer = mask.copy()
    fewer[0, np.flatnonzero(fewer[0])[0]] = False     # N:M-valid, area disagrees
    yield "perm", {"layers/0/col_perm.npy": dup}, None, "col_perm is not a permutation"
    yield "range", {"layers/0/col_perm.npy": perm + 1}, None, "col_perm holds values outside"
    yield "extra", {"layers/0/mask.npy": extra}, None, \
        r"the mask is not 2:4 after col_perm \(row 0: more than 2 kept"
    yield "fewer", {"layers/0/mask.npy": fewer}, None, "metrics say kept_area 384"
    yield "shape", {"layers/0/mask.npy": mask[:, :-4]}, None, "has shape .* expected \\(24, 32\\)"
    yield "perm_shape", {"layers/0/col_perm.npy": perm[:-4]}, None, "has shape"

    def edit(**change):
        def apply(doc):
            doc["layers"][0].update(change)
        return apply
    yield "nm", None, edit(nm=[4, 4]), "nm \\[4, 4\\], expected \\[N, M\\] with 1 <= N < M"
    yield "nm_type", None, edit(nm="2:4"), "nm '2:4', expected \\[N, M\\]"
    yield "nm_block", None, edit(block_shape=[1, 8]), \
        "block_shape \\[1, 8\\], expected \\[1, 4\\]"
    yield "nm_cols", None, edit(nm=[2, 3], block_shape=[1, 3]), "not a multiple of M = 3"
    yield "no_nm", None, lambda doc: doc["layers"][0].pop("nm"), "nm None, expected"
    yield "nm_on_grid", None, edit(format="grid"), "nm \\[2, 4\\] in a 'grid' layer"


@pytest.mark.parametrize("case", ["perm", "range", "extra", "fewer", "shape", "perm_shape",
                                  "nm", "nm_type", "nm_block", "nm_cols", "no_nm",
                                  "nm_on_grid"])
def test_tampered_nm_results_are_refused(saved, tmp_path, case):
    path, _ = saved
    _, arrays, meta, match = next(t for t in _tampers(path) if t[0] == case)
    bad = _rewrite(path, tmp_path / f"{case}.npz", arrays, meta)
    with pytest.raises(FormatError, match=match):
        load_result(bad)
    assert main(["inspect", str(bad)]) == 1            # a bad file, not a usage error


# -- pipeline and CLI ---------------------------------------------------------------------
def test_run_skips_layers_m_does_not_divide_and_is_byte_identical_across_jobs(small_npz,
                                                                              tmp_path):
    run = regroup_file(small_npz, format="nm")
    assert dict(run.skipped)["b.weight"] == ("N:M groups of 4 columns need a column count "
                                             "divisible by 4; the matrix is 24x30")
    assert [r.name for r in run.layers] == ["a.weight", "conv.weight"]
    run.save(tmp_path / "memory.npz")
    regroup_checkpoint(small_npz, tmp_path / "serial.npz", format="nm")
    regroup_checkpoint(small_npz, tmp_path / "jobs.npz", format="nm", jobs=2)
    memory = (tmp_path / "memory.npz").read_bytes()
    assert memory == (tmp_path / "serial.npz").read_bytes()
    assert memory == (tmp_path / "jobs.npz").read_bytes()
    meta = load_result(tmp_path / "jobs.npz").meta
    assert {"name": "b.weight", "reason": dict(run.skipped)["b.weight"]} in meta["skipped"]
    assert meta["options"]["nm"] == [2, 4]


def test_a_changed_nm_recomputes_finished_parts(small_npz, tmp_path):
    out = tmp_path / "out.npz"

    def stop(name, done, total, info):
        if name == "a.weight":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(small_npz, out, format="nm", progress=stop)
    assert regroup_checkpoint(small_npz, out, format="nm", nm="1:4").stats["resumed"] == 0
    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(small_npz, out, format="nm", progress=stop)
    assert regroup_checkpoint(small_npz, out, format="nm").stats["resumed"] == 1
    fresh = tmp_path / "fresh.npz"
    regroup_checkpoint(small_npz, fresh, format="nm")
    assert out.read_bytes() == fresh.read_bytes()


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8", "2:8"])
def test_cli_runs_every_nm_pattern(small_npz, tmp_path, capsys, nm):
    out, rep = tmp_path / "o.npz", tmp_path / "o.json"
    assert main(["run", str(small_npz), "--format", "nm", "--nm", nm, "-o", str(out),
                 "--report", str(rep)]) == 0
    printed = capsys.readouterr().out
    assert "efficacy" in printed and f"(nm {nm}, method auto, seed 0)" in printed
    n, m = map(int, nm.split(":"))
    report = json.loads(rep.read_text())
    res = load_result(out)
    with np.load(small_npz) as src:
        weights = dict(src)
    assert sorted(res) == ["a.weight", "conv.weight"]
    for row in report["layers"]:
        _check_layer(res[row["name"]], weights[row["name"]], (n, m))
        assert row["format"] == "nm" and row["block"] == [1, m] and row["nm"] == [n, m]
    assert report["options"]["nm"] == [n, m]


def test_cli_asp_against_the_default_search(small_npz, tmp_path):
    kept = {}
    for method in ("auto", "asp"):
        out = tmp_path / f"{method}.npz"
        assert main(["run", str(small_npz), "--format", "nm", "--method", method, "-o",
                     str(out), "-q"]) == 0
        res = load_result(out)
        with np.load(small_npz) as src:
            for name, r in res.items():
                _check_layer(r, src[name], (2, 4))
        kept[method] = {n: (r.metrics["retained_magnitude"],
                            r.metrics["retained_magnitude_identity"]) for n, r in res.items()}
        chosen = {"auto": "nm_search", "asp": "asp_search"}[method]
        assert {r.metrics["chosen"] for r in res.values()} == {chosen}
    # Both searches gain over plain 2:4 on every layer here (neither need dominate).
    for method in kept:
        assert all(k > plain for k, plain in kept[method].values()), method


def test_cli_on_the_bundled_example(tmp_path, capsys):
    out, rep = tmp_path / "ex.npz", tmp_path / "ex.json"
    assert main(["run", str(EXAMPLE), "--format", "nm", "--nm", "1:4", "-o", str(out),
                 "--report", str(rep), "-q"]) == 0
    res, report = load_result(out), json.loads(rep.read_text())
    with np.load(EXAMPLE) as src:
        weights = dict(src)
    # The three pruned layers, and the dense head: N:M prunes dense weights too.
    assert sorted(res) == ["conv1.weight", "fc1.weight", "fc2.weight", "head.weight"]
    for row in report["layers"]:
        _check_layer(res[row["name"]], weights[row["name"]], (1, 4))
        assert 0 < row["efficacy"] <= 1
        if row["name"] == "head.weight":
            assert row["retained"] == row["retained_identity"] == 0.25
            continue
        # Measured 0.986-0.999 against 0.84-0.88 for plain 1:4.
        assert row["retained_magnitude"] > row["retained_magnitude_identity"] + 0.05
        assert row["retained"] > row["retained_identity"]
    assert report["total"]["retained"] > report["total"]["retained_identity"]
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "fc1.weight" in shown and " nm " in shown and "1:4" in shown


def test_cli_usage_errors_exit_2_and_data_errors_exit_1(small_npz, tmp_path, capsys):
    o = ["-o", str(tmp_path / "x.npz"), "-q"]
    for argv, word in ((["--nm", "2:4"], "'--nm' option of regroup run"),
                       (["--format", "nm", "--method", "metis"], "'--method' option"),
                       (["--format", "nm", "--nm", "3:3"], "'--nm' option"),
                       (["--format", "nm", "--block", "16"], "'--block' option"),
                       (["--format", "nm", "--budget", "density=0.1"], "'--budget' option")):
        assert main(["run", str(small_npz), *argv, *o]) == 2, argv
        assert word in capsys.readouterr().err
    np.savez(tmp_path / "odd.npz", w=_weights(0, 8, 30))
    assert main(["run", str(tmp_path / "odd.npz"), "--format", "nm", *o]) == 1
    assert "divisible by 4" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_show_draws_an_nm_layer(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src, png = tmp_path / "two.npz", tmp_path / "a.png"
    np.savez(src, **{"odd.weight": _weights(1, 24, 30), "ok.weight": _weights(0, 24, 32)})
    # The first usable layer is one M divides (odd.weight's 30 columns are skipped).
    assert main(["show", str(src), "--format", "nm", "--nm", "1:4", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ok.weight, retained" in capsys.readouterr().out
    assert main(["show", str(src), "--format", "nm", "--layer", "odd.weight", "-o",
                 str(png)]) == 1
    assert "divisible by 4" in capsys.readouterr().err


def test_compare_runs_the_nm_searches_side_by_side(small_npz, tmp_path, capsys):
    rows = compare([small_npz], ["auto", "asp"], format="nm")
    assert [(r["layer"], r["method"]) for r in rows] == [
        ("a.weight", "auto"), ("a.weight", "asp"), ("conv.weight", "auto"),
        ("conv.weight", "asp")]
    assert all(r["format"] == "nm" and r["kept_blocks"] is None for r in rows)
    assert all(r["retained"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="'method' parameter of compare must be one of "
                                         "'auto', 'asp'"):
        compare([small_npz], ["metis"], format="nm")
    # The CLI's default methods follow the format.
    assert main(["compare", str(small_npz), "--format", "nm"]) == 0
    shown = capsys.readouterr().out
    assert "auto" in shown and "asp" in shown and "1 tensors skipped" in shown
    assert main(["compare", str(small_npz), "--format", "nm", "--methods", "sort"]) == 2


def test_compare_and_run_take_the_same_nm_layers(tmp_path):
    """One N:M layer rule (regroup.io.layer_pattern(nm=)): a dense weight is pruned (N:M's
    usual input), a matrix smaller than the block options' default is taken (a 1xM group
    fits it), columns M does not divide are skipped - in compare and run alike."""
    rng = np.random.default_rng(0)
    tensors = {"dense.weight": rng.standard_normal((24, 32)),
               "tiny.weight": _weights(3, 4, 8), "odd.weight": _weights(1, 24, 30)}
    src = tmp_path / "m.npz"
    np.savez(src, **tensors)
    rows = compare([src], ["auto"], format="nm")
    assert [r["layer"] for r in rows] == ["dense.weight", "tiny.weight"]
    run = regroup_file(src, format="nm")
    assert [r.name for r in run.layers] == ["dense.weight", "tiny.weight"]
    assert [name for name, _ in run.skipped] == ["odd.weight"]
    for r in run.layers:
        _check_layer(r, tensors[r.name], (2, 4))
    # The block formats keep their own rule: the dense weight is not pruned there.
    assert [r["layer"] for r in compare([src], ["identity"], block=4)] == ["tiny.weight",
                                                                         "odd.weight"]


def test_nm_layers_hold_the_nm_mask_of_the_weight_read_from_a_prune_pair(tmp_path):
    """The score is |weight| where a mask keeps it: a prune pair (weight_orig, mask)."""
    w = _weights(6, 16, 32, 1.0)
    keep = np.random.default_rng(1).random(w.shape) < 0.5
    np.savez(tmp_path / "p.npz", **{"fc.weight_orig": w, "fc.weight_mask": keep.astype(
        np.float32)})
    run = regroup_file(tmp_path / "p.npz", format="nm")
    r = run.layers[0]
    assert r.name == "fc.weight"
    _check_layer(r, w * keep, (2, 4))


def test_the_example_retains_more_than_plain_nm_under_2_4():
    run = regroup_file(EXAMPLE, format="nm", layers="fc2.weight")
    (r,) = run.layers
    assert r.metrics["retained_magnitude"] >= r.metrics["retained_magnitude_identity"]
    # Brief's check (retained_magnitude >= retained_identity) also holds on the example.
    assert r.metrics["retained_magnitude"] >= r.metrics["retained_identity"]
    assert regroup.nm.nm_retained(np.abs(np.load(EXAMPLE)["fc2.weight"]), (2, 4),
                                  r.col_perm) >= regroup.nm.nm_retained(
        np.abs(np.load(EXAMPLE)["fc2.weight"]), (2, 4))


def test_replacing_the_format_drops_what_nm_set():
    o = RegroupOptions(format="nm", nm="1:4")
    assert (o.block, o.nm) == ((1, 4), (1, 4))
    grid = o.replace(format="grid")
    assert (grid.format, grid.block, grid.nm) == ("grid", RegroupOptions().block, None)
    assert o.replace(format="shuffled", block=16).block == (16, 16)
    assert o.replace(seed=3).nm == (1, 4)              # staying N:M keeps it
    with pytest.raises(ValueError, match="'nm' parameter"):
        o.replace(format="grid", nm="2:4")              # given explicitly: still refused


def test_dense_weights_are_n_m_pruned_and_dense_above_is_refused(tmp_path, capsys):
    """N:M prunes dense weights (ASP's input); the block formats skip them as not pruned."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64)).astype(np.float32)          # no zero at all
    path = tmp_path / "dense.npz"
    np.savez(path, **{"fc.weight": w, "fc.bias": w[0]})
    out = tmp_path / "r.npz"
    assert main(["run", str(path), "--format", "nm", "-o", str(out), "-q"]) == 0
    r = regroup.load_result(out)["fc.weight"]
    _check_layer(r, w, (2, 4))
    assert r.metrics["retained"] == 0.5
    assert r.metrics["retained_magnitude"] > r.metrics["retained_magnitude_identity"]
    assert main(["run", str(path), "-o", str(tmp_path / "g.npz"), "-q"]) == 1
    assert "fully dense" in capsys.readouterr().err
    assert main(["run", str(path), "--format", "nm", "--dense-above", "1", "-o",
                 str(tmp_path / "x.npz")]) == 2
    assert "'--dense-above' option" in capsys.readouterr().err
    r2 = regroup.regroup_pattern(from_array(w, name="fc.weight"), format="nm", nm="1:4")
    _check_layer(r2, w, (1, 4))
