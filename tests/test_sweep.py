"""`regroup sweep`: retained and CPU speed-up against block density over budgets."""
from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from regroup import RegroupError, from_array, regroup_pattern
from regroup.blocks import parse_budgets
from regroup.cli import main
from regroup.engine import regroup_budgets
from regroup.kernel_speed import speed_problem, time_layer
from regroup.sweep import CSV_COLUMNS, DEFAULT_BUDGETS, sweep
from regroup.synthetic import planted_weights

from .conftest import EXAMPLE, random_mask

DENSITIES = ("density=0.05", "density=0.1", "density=0.2", "density=0.3", "density=0.5")
SAME = ("retained", "retained_magnitude", "retained_identity", "kept_blocks", "kept_area",
        "fill", "chosen", "candidates", "candidates_refined", "budget")


def weighted(seed: int, n: int = 96, m: int = 80, density: float = 0.15):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, m)) * random_mask(rng, n, m, density)
    return from_array(w, name=f"w{seed}")


def objective(row: dict) -> float:
    """What the selection maximised: |w| when known, else the count."""
    return row["retained_magnitude"] if row["retained_magnitude"] is not None \
        else row["retained"]


# -- the engine: several budgets, partitioners once ----------------------------------------
@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("method", ["auto", "random", "metis", "identity"])
def test_regroup_budgets_equals_independent_runs(fmt, method):
    pat = weighted(1)
    budgets = ["density=0.1", "iso", "blocks=7", "retained=0.5"]
    got = regroup_budgets(pat, budgets, block=16, format=fmt, method=method)
    for b, r in zip(budgets, got):
        ref = regroup_pattern(pat, block=16, format=fmt, method=method, budget=b)
        assert np.array_equal(r.row_perm, ref.row_perm) and np.array_equal(r.mask, ref.mask)
        assert (r.col_perm is None) == (ref.col_perm is None)
        if r.col_perm is not None:
            assert np.array_equal(r.col_perm, ref.col_perm)
        assert {k: r.metrics.get(k) for k in SAME} == {k: ref.metrics.get(k) for k in SAME}


def test_regroup_budgets_runs_each_partitioner_once_and_replays_failures():
    from regroup.partitioners import get_partitioner
    from regroup.partitioners.metis import metis

    calls = []

    def broken(X, size, *, rng, **params):
        calls.append(params.get("graph"))
        raise RuntimeError("simulated crash")
    spec = get_partitioner("metis")
    object.__setattr__(spec, "func", broken)      # the spec is frozen; restored below
    try:
        pat = weighted(2, 64, 64, 0.1)
        with pytest.warns(RuntimeWarning, match=r"candidate 'metis(:graph=jaccard)?' failed"):
            got = regroup_budgets(pat, "density=0.1,density=0.2,iso", block=16)
    finally:
        object.__setattr__(spec, "func", metis)
    assert len(calls) == 2            # metis and metis:graph=jaccard, once each, 3 budgets
    for r in got:
        assert set(r.metrics["failed"]) == {"metis", "metis:graph=jaccard"}
        assert "simulated crash" in r.metrics["failed"]["metis"]


def test_parse_budgets_errors_name_the_parameter():
    assert [str(b) for b in parse_budgets(" density=0.1, iso=1,iso=2", "budgets", "f")] == \
        ["density=0.1", "iso", "iso=2"]
    for bad, kind, match in [("", ValueError, "entry ''"), ("iso,iso=1", ValueError,
                                                               "'iso' is given twice"),
                             ("density=2", ValueError, "entry 'density=2'"),
                             ([], ValueError, "Got \\[\\] instead"),
                             (0.5, TypeError, "Got float instead")]:
        with pytest.raises(kind, match=r"The 'budgets' parameter of sweep must be .*" + match):
            parse_budgets(bad, "budgets", "sweep")


# -- the properties of a sweep ---------------------------------------------------------------
@pytest.fixture(scope="module")
def example_sweep():
    """The bundled example (3 layers with weights), no timing."""
    return sweep(EXAMPLE, block=16, speed=False)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_auto_retains_at_least_identity_at_every_budget(seed, fmt):
    """auto's portfolio holds identity and keeps its best refined candidate, so at every
    budget it keeps at least identity's objective (|w| here, count without weights)."""
    pats = [weighted(seed), from_array(random_mask(np.random.default_rng(seed), 70, 90, 0.2),
                                       name="mask")]
    planted = planted_weights(96, 96, block=16, block_density=0.2, sparsity=0.85, seed=seed)
    pats.append(from_array(planted.weight, name="planted"))
    s = sweep(pats, block=16, format=fmt, budgets=DENSITIES + ("iso", "blocks=3"),
              speed=False)
    rows = {(r["layer"], r["method"], r["budget"]): r for r in s.layers}
    assert len(rows) == 3 * 2 * 7
    for (layer, method, budget), r in rows.items():
        if method == "auto":
            ident = rows[(layer, "identity", budget)]
            assert objective(r) >= objective(ident) - 1e-12, (layer, budget)
    for m in s.model:       # and so does the model (the same weights sum both)
        if m["method"] == "auto":
            ident = next(x for x in s.model if x["method"] == "identity"
                         and x["budget"] == m["budget"])
            assert objective(m) >= objective(ident) - 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_identity_retained_is_nondecreasing_in_the_budget(seed):
    """Without permutations, a larger area keeps a superset of the greedy blocks (equal
    areas: shapes divisible by the block). Not guaranteed for auto: its column order and
    refinement are chosen per budget (DLMC sample: see the report)."""
    s = sweep([weighted(seed, 96, 80), from_array(random_mask(np.random.default_rng(seed),
                                                               64, 96, 0.3), name="m")],
              block=16, budgets=DENSITIES + ("density=1.0",), speed=False)
    for layer in ("w%d" % seed, "m"):
        rows = [r for r in s.layers if r["layer"] == layer and r["method"] == "identity"]
        values = [objective(r) for r in rows]
        assert values == sorted(values) and values[-1] == pytest.approx(1.0)
        assert [r["block_density"] for r in rows] == sorted(r["block_density"] for r in rows)


def test_model_rows_are_weighted_sums_of_layer_rows(example_sweep):
    s = example_sweep
    assert len(s.model) == len(DEFAULT_BUDGETS) * 2 and s.magnitude
    for m in s.model:
        rows = [r for r in s.layers if r["method"] == m["method"] and r["budget"] == m["budget"]]
        assert m["layers"] == len(rows) == 3
        nnz, size = sum(r["nnz"] for r in rows), sum(r["rows"] * r["cols"] for r in rows)
        assert m["nnz"] == nnz and m["size"] == size
        assert m["block_density"] == pytest.approx(sum(r["kept_area"] for r in rows) / size)
        assert m["retained"] == pytest.approx(sum(r["retained"] * r["nnz"] for r in rows) / nnz)
        mass = sum(r["abs_weight"] for r in rows)
        assert m["retained_magnitude"] == pytest.approx(
            sum(r["retained_magnitude"] * r["abs_weight"] for r in rows) / mass)
        assert m["kept_blocks"] == sum(r["kept_blocks"] for r in rows)
        assert m["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    # |w| of a layer is the sum of its absolute weights, read from the file
    w = np.load(EXAMPLE)["fc1.weight"]
    fc1 = next(r for r in s.layers if r["layer"] == "fc1.weight")
    assert fc1["abs_weight"] == pytest.approx(float(np.abs(w).sum()))


def test_block_density_is_the_kept_blocks_area_over_the_size():
    pat = weighted(5, 96, 80)                       # 6 x 5 blocks of 16 x 16: no edges
    odd = weighted(6, 100, 90)                      # short edge blocks
    s = sweep([pat, odd], block=16, budgets="density=0.1,iso,density=0.5", speed=False)
    for r in s.layers:
        size = r["rows"] * r["cols"]
        assert r["block_density"] == pytest.approx(r["kept_area"] / size)
        if r["layer"] == pat.name:
            assert r["kept_area"] == r["kept_blocks"] * 16 * 16
        else:
            assert r["kept_area"] <= r["kept_blocks"] * 16 * 16
        ref = regroup_pattern(odd if r["layer"] == odd.name else pat, block=16,
                              method=r["method"], budget=r["budget"])
        assert r["kept_area"] == int(ref.mask.sum())            # what the layout covers
        assert r["retained"] == ref.metrics["retained"]
        if r["budget"].startswith("density"):
            assert r["block_density"] <= float(r["budget"].split("=")[1]) + 1e-12


def test_sweep_options_and_errors():
    pat = weighted(0)
    with pytest.raises(ValueError, match="'budget_scope' parameter of sweep must be 'layer'"):
        sweep(pat, budget_scope="global")
    with pytest.raises(ValueError, match="'methods' parameter of sweep .*'auto' is given twice"):
        sweep(pat, methods="auto,auto")
    with pytest.raises(ValueError, match="'methods' parameter of sweep .*entry 'nope'"):
        sweep(pat, methods=["identity", "nope"])
    with pytest.raises(ValueError, match="'budgets' parameter of sweep"):
        sweep(pat, budgets="density=0")
    with pytest.raises(TypeError, match="'speed' parameter of sweep must be a bool"):
        sweep(pat, speed="yes")
    with pytest.raises(ValueError, match="'batch' parameter of sweep"):
        sweep(pat, batch=0)
    with pytest.raises(ValueError, match="'block' parameter of sweep"):
        sweep(pat, block=0)
    with pytest.raises(TypeError, match="'source' parameter of sweep"):
        sweep(3)
    with pytest.raises(RegroupError, match="no layer matches 'fc9'"):
        sweep(pat, layers="fc9")
    with pytest.raises(RegroupError, match="no usable layer.*smaller than the block"):
        sweep(pat, block=128, speed=False)


def test_progress_reports_every_layer_and_method(example_sweep):
    seen = []
    s = sweep(EXAMPLE, block=8, budgets="iso", methods="identity", speed=False,
              progress=lambda label, done, total, info: seen.append((label, done, total,
                                                                     info["status"])))
    # The 1-D bias is skipped from the index alone, the dense 10x128 head once read (as
    # the pipeline does); with 16x16 blocks the head is skipped from the index too.
    assert seen == [("conv1.weight:identity", 1, 4, "done"),
                    ("fc1.weight:identity", 2, 4, "done"),
                    ("fc2.weight:identity", 3, 4, "done"),
                    ("head.weight", 4, 4, "skipped")]
    assert dict(s.skipped)["head.weight"].startswith("fully dense")
    assert "1-D tensor" in dict(s.skipped)["fc1.bias"]
    assert "smaller than the block 16x16" in dict(example_sweep.skipped)["head.weight"]


# -- the speed columns -------------------------------------------------------------------------
def test_speed_is_measured_with_torch():
    pytest.importorskip("torch")
    s = sweep(weighted(3, 128, 128), block=16, budgets="density=0.1,density=0.5",
              methods="identity", threads=1)
    assert s.speed["measured"] and s.speed["note"] is None and s.speed["threads"] == 1
    assert s.speed["torch"] and s.speed["batch"] == 256
    for r in s.layers + s.model:
        assert r["dense_ms"] > 0 and r["bsr_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["bsr_ms"])
    assert s.summary().startswith("identity: ")


def test_timed_bsr_products_compute_the_layer_product():
    """What is timed is a real product of the layer's shape: the BSR weight of
    ``kept`` random blocks times x equals the dense product of the same weight."""
    torch = pytest.importorskip("torch")
    from regroup.kernel_speed import _bsr_product

    x = torch.randn(8, 70)
    for fmt in ("grid", "shuffled"):
        run, bsr, gather = _bsr_product(torch, (50, 70), (16, 16), 5, fmt, seed=1)
        y = run(x)
        assert y.shape == (8, 50) and bsr._nnz() == 5
        dense = bsr.to_dense()
        if fmt == "grid":                  # 50 x 70 padded to 4 x 5 blocks of 16
            assert dense.shape == (64, 80) and gather is None
            ref = torch.nn.functional.pad(x, (0, 10)) @ dense.T
        else:                              # one block column per tile, its columns gathered
            assert dense.shape == (64, 5 * 16) and gather.shape == (5 * 16,)
            ref = torch.nn.functional.pad(x, (0, 1))[:, gather] @ dense.T
        assert torch.allclose(y, ref[:, :50], atol=1e-5)
        again = _bsr_product(torch, (50, 70), (16, 16), 5, fmt, seed=1)[1]
        assert torch.equal(again.to_dense(), dense)          # deterministic for a seed


def test_time_layer_is_bounded_and_its_layouts_deterministic():
    pytest.importorskip("torch")
    from regroup.kernel_speed import _kept_grid

    t = time_layer((64, 64), 16, [0, 3, 3, 16], max_reps=4, max_seconds=0.0, threads=1)
    assert t.rounds == 3 and set(t.bsr) == {0, 3, 16} and t.bsr[0] == 0.0
    assert t.speedup(0) is None and t.speedup(16) == pytest.approx(t.dense / t.bsr[16])
    a = _kept_grid(np.random.default_rng([0, 64]), 4, 4, 6)
    assert all(np.array_equal(u, v) for u, v in zip(a, _kept_grid(np.random.default_rng(
        [0, 64]), 4, 4, 6)))
    assert len(set(zip(*a))) == 6
    with pytest.raises(ValueError, match="'block' parameter of time_layer must be square"):
        time_layer((64, 64), (16, 8), [1])
    with pytest.raises(ValueError, match="'kept_blocks' parameter of time_layer .*\\[0, 16\\]"):
        time_layer((64, 64), 16, [17])


def test_without_torch_the_speed_is_empty_and_the_reason_given(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)        # `import torch` now fails
    assert "torch is not importable" in speed_problem(16)
    s = sweep(weighted(0), block=16, budgets="iso")
    assert not s.speed["measured"] and "torch is not importable" in s.speed["note"]
    assert all(r["speedup"] is None and r["dense_ms"] is None for r in s.layers + s.model)
    assert "speed-up not measured: torch is not importable" in s.markdown()
    with pytest.raises(ImportError, match="time_layer requires torch"):
        time_layer((32, 32), 16, [1])
    out = tmp_path / "s.csv"
    assert main(["sweep", str(EXAMPLE), "--block", "16", "--budgets", "iso", "--methods",
                 "identity", "--csv", str(out)]) == 0
    assert "speed-up not measured: torch is not importable" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert all(r["speedup"] == "" and "torch is not importable" in r["speed_note"]
               for r in rows)


def test_non_square_blocks_have_no_cpu_speed():
    s = sweep(weighted(0), block="16x8", budgets="iso", methods="identity")
    assert not s.speed["measured"] and "square blocks" in s.speed["note"]


# -- the command line ------------------------------------------------------------------------
def test_cli_writes_csv_markdown_and_png(tmp_path, capsys):
    csv_path, md, png = tmp_path / "s.csv", tmp_path / "s.md", tmp_path / "s.png"
    assert main(["sweep", str(EXAMPLE), "--block", "16", "--budgets", "density=0.1,iso",
                 "--threads", "1", "--csv", str(csv_path), "--md", str(md),
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "auto" in out and "identity" in out and "3 layers, 2 tensors skipped" in out
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == list(CSV_COLUMNS)
    model = [r for r in rows if r["scope"] == "model"]
    layers = [r for r in rows if r["scope"] == "layer"]
    assert len(model) == 2 * 2 and len(layers) == 3 * 2 * 2
    for r in model:
        part = [x for x in layers if x["method"] == r["method"] and x["budget"] == r["budget"]]
        assert int(r["kept_area"]) == sum(int(x["kept_area"]) for x in part)
        assert float(r["block_density"]) == pytest.approx(
            int(r["kept_area"]) / int(r["size"]))
    text = md.read_text()
    assert text.startswith("# Budget sweep: example.npz") and "## Model" in text
    assert "| method | budget | layers |" in text and "## Skipped tensors" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mpl_image = pytest.importorskip("matplotlib.image")
    assert mpl_image.imread(str(png)).shape[2] in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.md", "s.png"]


@pytest.mark.parametrize("args,code,match", [
    (["--budgets", "density=2"], 2, "'--budgets' option of regroup sweep"),
    (["--budgets", "iso,iso=1"], 2, "'iso' is given twice"),
    (["--methods", "hmetis"], 2, "'--methods' option of regroup sweep"),
    (["--block", "0"], 2, "'--block' option of regroup sweep"),
    (["--threads", "0"], 2, "'--threads' option of regroup sweep"),
    (["--format", "bsr"], 2, "invalid choice: 'bsr'"),
    (["--block", "4096"], 1, "no usable layer"),
    (["--layers", "nope*"], 1, "no layer matches 'nope\\*'"),
])
def test_cli_errors(tmp_path, capsys, args, code, match):
    out = tmp_path / "s.csv"
    assert main(["sweep", str(EXAMPLE), "--no-speed", "--csv", str(out), *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(match, err[-1])
    if "invalid choice" not in match:      # argparse prints its usage first; we do not
        assert len(err) == 1
    assert not out.exists()


def test_cli_missing_input_and_output_directory(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt: no such file" in capsys.readouterr().err
    bad = tmp_path / "nodir" / "s.csv"
    assert main(["sweep", str(EXAMPLE), "--no-speed", "--csv", str(bad)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep"]) == 2


def test_cli_help_lists_sweep():
    h = subprocess.run([sys.executable, "-m", "regroup.cli", "--help"], capture_output=True,
                       text=True)
    assert h.returncode == 0 and "sweep" in h.stdout
    h = subprocess.run([sys.executable, "-m", "regroup.cli", "sweep", "--help"],
                       capture_output=True, text=True)
    assert h.returncode == 0 and "--budgets" in h.stdout and "--no-speed" in h.stdout


def test_import_of_sweep_does_not_load_torch():
    code = ("import sys, regroup.sweep, regroup.kernel_speed, regroup.plot; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# -- real data ---------------------------------------------------------------------------------
def test_real_dlmc_files(dlmc_dir):
    files = [dlmc_dir / "rn50/variational_dropout/0.9/bottleneck_2_block_group1_1_1.smtx",
             dlmc_dir / "transformer/magnitude_pruning/0.8"
             / "body_encoder_layer_0_self_attention_multihead_attention_q_fully_connected.smtx"]
    for f in files:
        if not f.exists():
            pytest.skip(f"{f} not in the DLMC copy")
    s = sweep(files[0], block=16, budgets="density=0.1,density=0.3,iso", speed=False)
    assert not s.magnitude and {r["layer"] for r in s.layers} == {files[0].stem}
    by = {(r["method"], r["budget"]): r for r in s.layers}
    for b in s.budgets:
        assert by[("auto", b)]["retained"] >= by[("identity", b)]["retained"]
    assert by[("auto", "iso")]["retained"] > by[("identity", "iso")]["retained"] + 0.05
    pytest.importorskip("torch")
    s = sweep(files[1], block=32, budgets="density=0.1", methods="identity", threads=1)
    (r,) = s.layers
    assert (r["rows"], r["cols"]) == (512, 512) and r["speedup"] > 0
    assert r["kept_blocks"] == 25                     # floor(0.1 * 256 blocks)


def test_small_pruned_checkpoint(tmp_path, capsys):
    """A torch.nn.utils.prune state dict: magnitudes from weight_orig, skips listed."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(100, 64)
    model.fc1, model.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
    for mod in (model.fc1, model.fc2):
        prune.l1_unstructured(mod, "weight", amount=0.8)
    ckpt = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), ckpt)
    csv_path = tmp_path / "s.csv"
    assert main(["sweep", str(ckpt), "--block", "16", "--budgets", "density=0.2,iso",
                 "--threads", "1", "--csv", str(csv_path), "-q"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["layer"] for r in rows if r["scope"] == "layer"} == {"fc1.weight", "fc2.weight"}
    for r in rows:
        assert r["retained_magnitude"] != "" and float(r["speedup"]) > 0
        if r["scope"] == "layer":
            mod = getattr(model, r["layer"].split(".")[0])
            w = (mod.weight_orig * mod.weight_mask).detach()
            assert float(r["abs_weight"]) == pytest.approx(float(w.abs().sum()), rel=1e-6)
    s = sweep(ckpt, block=16, budgets="iso", speed=False)
    skipped = dict(s.skipped)
    assert "embedding table" in skipped["embed_tokens.weight"]
    assert "1-D" in skipped["fc1.bias"]
