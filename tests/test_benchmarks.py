"""Smoke runs of the benchmark scripts (their --quick modes): slow, so they run under the
``slow`` marker (``make test-slow``), not in the default suite."""
import csv
import importlib.util
import json
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _bench(name="dlmc_bench"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # Registered under its name, as an import would: worker processes (real_models'
    # --jobs) find its functions by that name.
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_writes_tables_plots_and_resumes(tmp_path, dlmc_dir):
    pytest.importorskip("matplotlib")
    pytest.importorskip("kahypar")
    bench = _bench()
    args = ["--quick", "--out", str(tmp_path), "--methods", "identity,sort,dsb"]
    assert bench.main(args) == 0
    out = tmp_path / "quick"
    with open(out / "dlmc_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 3 * 2
    assert {r["method"] for r in rows} == {"identity", "sort", "dsb"}
    summary = (out / "dlmc_summary.md").read_text()
    assert "### grid, b=32, budget iso" in summary and "x dsb" in summary
    assert "Structure-LTH at its own block area" in summary
    for name in ("retained_by_pruning_grid.png", "retained_vs_time_shuffled.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert bench.main(args) == 0                      # resumes: nothing new to run
    with open(out / "dlmc_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_digits_example_quick_runs_every_variant(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    assert _bench("digits_example").main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "digits_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["IMP", "IMP-Regroup grid", "IMP-Regroup shuffled",
                                            "naive blocks", "IMP-Refill"]
    for r in rows:
        assert 0.5 < float(r["acc_mean"]) <= 1     # chance is 0.1; --quick trains briefly
        assert float(r["achieved_sparsity"]) >= 0.89
    # The example asserts internally that the folded and block-sparse models compute the
    # trained masked model; block variants report a timing.
    assert all(r["block_ms"] for r in rows[1:4])


def test_kernel_bench_quick_checks_its_outputs(tmp_path):
    pytest.importorskip("torch")
    bench = _bench("kernel_bench")
    assert bench.main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "kernel_bench_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        assert float(r["grid_maxerr"]) < 1e-3 and float(r["shuffled_maxerr"]) < 1e-3
        assert r["grid_auto"] in ("bsr", "dense")
        # The CSR baseline: exact, and as many nonzeros as the block layouts keep.
        assert float(r["csr_relerr"]) < 1e-5 and float(r["csr_ms"]) > 0
        assert int(r["csr_nnz"]) == int(r["grid_nnz"]) == int(r["shuffled_nnz"])


def test_llm_bench_quick_serial_parallel_and_dask_agree(tmp_path):
    pytest.importorskip("distributed")
    assert _bench("llm_bench").main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "llm_bench_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["serial", "serial, 1 core", "jobs 2", "dask, 2 workers"]
    assert all(r["identical"] == "True" and r["matrices"] == "7" for r in rows)


def test_ceiling_bench_quick_anneals_from_both_starts(tmp_path, dlmc_dir):
    bench = _bench("ceiling_bench")
    assert bench.main(["--quick", "--data", str(dlmc_dir), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "ceiling_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        auto, dsb = float(r["auto"]), float(r["dsb"])
        assert 0 < float(r["identity"]) <= auto <= 1 and 0 < dsb <= 1
        # Annealing started from auto's own panels never reports less than that start.
        assert float(r["anneal_from_auto"]) >= auto - 1e-12
        assert 0 < float(r["anneal_from_identity"]) <= 1
        assert float(r["best"]) == max(auto, float(r["anneal_from_auto"]),
                                       float(r["anneal_from_identity"]))
    assert "auto / DSB" in (tmp_path / "ceiling_quick.md").read_text()


def test_portfolio_bench_quick_replays_the_finalist_policies(tmp_path, dlmc_dir):
    bench = _bench("portfolio_bench")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "portfolio_quick.json").read_text())
    assert {r["format"] for r in rows} == {"grid", "shuffled"} and len(rows) == 8
    for r in rows:
        assert set(r["before"]) == set(r["after"]) and len(r["after"]) == 6
        # Finishing (column step, refinement) never lowers a candidate.
        assert all(r["after"][c] >= r["before"][c] - 1e-12 for c in r["after"])
    table = (tmp_path / "portfolio_quick.md").read_text()
    assert table.count("| all 6 |") == 2 and "| 0 of 4 |" in table


def test_real_models_quick_compares_every_method(tmp_path, real_mobilenet, real_minilm):
    bench = _bench("real_models")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "real_models_quick.csv") as f:
        rows = list(csv.DictReader(f))
    for model in ("mobilenet_v2", "minilm"):
        got = {r["method"] for r in rows if r["model"] == model}
        assert got == set(bench.METHODS), (model, got)
    for r in rows:
        assert -1.0 <= float(r["after"]) <= 1.0 and int(r["steps"]) == 2
        # what each mask keeps of the dense model: shares of it
        for key in ("kept |w|", "kept act^2", "dead rows", "dead cols"):
            assert 0.0 <= float(r[key]) <= 1.0, (key, r)
    # the unstructured mask keeps the largest |w| of the pruned layers: no block mask of
    # (at most) as many weights keeps more |w| of a layer pruned per layer (MiniLM)
    kept = {r["method"]: float(r["kept |w|"]) for r in rows if r["model"] == "minilm"}
    assert kept["unstructured"] >= max(kept.values()) - 1e-9, kept
    # auto is regroup_model's default: chain on (the model is traced); "auto per-layer" off
    chain = {(r["model"], r["method"]): r["chain"] for r in rows if r["method"].startswith("auto")}
    assert all(c == "0.01" for (_, m), c in chain.items() if m != "auto per-layer"), chain
    assert {c for (_, m), c in chain.items() if m == "auto per-layer"} == {""}, chain
    # one speed row per configuration, auto's block-sparse model timed against dense
    with open(tmp_path / "real_models_quick_speed.csv") as f:
        speed = list(csv.DictReader(f))
    assert sorted((r["model"], r["block"]) for r in speed) == [("minilm", "32"),
                                                               ("mobilenet_v2", "16")]
    for r in speed:
        assert int(r["auto_timed_layers"]) == int(r["layers"]) > 0, r
        assert 0 <= int(r["auto_sparse_layers"]) <= int(r["layers"]), r
        for key in ("dense_ms", "auto_ms", "bsr_ms"):
            assert float(r[key]) > 0, (key, r)
    table = (tmp_path / "real_models_quick.md").read_text()
    assert "CPU speed of auto's block-sparse model" in table


def test_nm_bench_quick_compares_plain_asp_and_regroup(tmp_path):
    bench = _bench("nm_bench")
    try:
        bench.zoo.minilm_dir()
        bench.zoo.mobilenet_v2_weights()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    assert bench.main(["--quick", "--nm", "2:4", "4:8", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "nm_bench_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["nm"] for r in rows] == ["2:4"] * 4 + ["4:8"] * 4
    for r in rows:
        plain, ceiling = float(r["plain"]), float(r["ceiling"])
        assert plain <= float(r["regroup kept"]) <= ceiling
        if r["nm"] == "2:4":
            assert plain <= float(r["asp kept"]) <= ceiling
        else:
            assert r["asp kept"] == ""          # ASP's splits are for M <= 4
    assert "### 2:4" in (tmp_path / "nm_bench_quick.md").read_text()
    # windows solved exactly: no search beats the optimum, none loses to plain N:M
    assert bench.main(["--quick", "--windows", "--nm", "2:4", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "nm_windows_quick.csv") as f:
        rows = list(csv.DictReader(f))
    # MiniLM's two 64x64 matrices give two windows each; MobileNetV2's first ones are narrower
    assert sum(r["matrix"].startswith("minilm/") for r in rows) == 4
    assert all(r["shape"].endswith("x24") for r in rows)
    for r in rows:
        for label in ("regroup", "asp"):
            assert -1e-9 <= float(r[f"{label} gain"]) <= float(r["optimal gain"]) + 1e-6


def test_dst_bench_quick_trains_every_method_on_the_same_budget(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    bench = _bench("dst_bench")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "dst_bench_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for r in rows:
        assert r["seeds"] == "2" and 0 <= float(r["acc_min"]) <= float(r["acc_mean"]) <= 1
        assert 0 < float(r["mask_update_share"]) < 1
        # every method trains as many weights per layer: 5 and 8 16x16 tiles, head ERK
        assert (r["kept_fc1"], r["kept_fc2"], r["kept_head"]) == ("1280", "2048", "1024")
    by = {r["method"]: r for r in rows}
    assert float(by["RigL"]["acc_mean"]) > 0.5          # chance is 0.1; --quick is short
    assert float(by["RegroupDST"]["gap_closed"]) == pytest.approx(
        (float(by["RegroupDST"]["acc_mean"]) - float(by["block RigL"]["acc_mean"]))
        / (float(by["RigL"]["acc_mean"]) - float(by["block RigL"]["acc_mean"])))
    assert "churn <=" in by["RegroupDST"]["notes"]      # asserted <= d_t inside the run
    assert "ttest_rel" in (tmp_path / "dst_bench_quick.md").read_text()


def test_dst_bench_mobilenet_trains_every_method_at_the_same_density(tmp_path, real_mobilenet):
    pytest.importorskip("sklearn")
    bench = _bench("dst_bench")
    assert bench.main(["--mobilenet", "--steps", "6", "--T", "2", "--seeds", "1",
                       "--out", str(tmp_path)]) == 0
    with open(tmp_path / "dst_mobilenet.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(bench.MOBILENET_METHODS)
    for r in rows:
        assert 0 <= float(r["acc_mean"]) <= 1
        # ERK at 90 % over the 34 1x1 convs; blocks round each layer's count up
        assert 0.099 < float(r["density"]) < 0.11
    assert float(rows[0]["vs_rigl"]) == 0


def test_dst_bench_speed_times_both_executions(tmp_path):
    pytest.importorskip("torch")
    bench = _bench("dst_bench")
    assert bench.main(["--speed", "--steps", "1", "--repeat", "1", "--batch", "8",
                       "--speed-sparsities", "0.9", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "dst_speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["format"], r["execution"]) for r in rows] == [
        ("grid", "masked"), ("grid", "block"), ("shuffled", "masked"), ("shuffled", "block")]
    assert all(float(r["step_ms"]) > 0 and float(r["update_ms"]) > 0
               and float(r["relayout_update_ms"]) > 0 and float(r["armed_step_ms"]) > 0
               for r in rows)


def test_dst_bench_cost_relayout_never_keeps_less_than_before(tmp_path, zoo):
    pytest.importorskip("transformers")
    try:
        zoo.minilm_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    bench = _bench("dst_bench")
    assert bench.main(["--cost", "--repeat", "1", "--warm-rounds", "1",
                       "--out", str(tmp_path)]) == 0
    with open(tmp_path / "dst_cost.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["shape"] for r in rows] == ["1536x384", "384x1536"]
    assert {r["warm rounds"] for r in rows} == {"1"}
    for r in rows:
        # the warm start keeps the old tiles' orders: re-picking can only gain
        assert float(r["regroup warm kept"]) >= float(r["kept before"]) - 1e-4
        assert 0 < float(r["DSB from scratch kept"]) <= 1
