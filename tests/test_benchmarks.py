"""Smoke test of the DLMC benchmark harness (the --quick subset), including resuming."""
import csv
import importlib.util

import pytest

from .conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("dlmc_bench",
                                                  ROOT / "benchmarks" / "dlmc_bench.py")
    mod = importlib.util.module_from_spec(spec)
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
