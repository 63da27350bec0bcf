"""Benchmark regroup's partitioners and the published baselines on the DLMC matrices.

    python benchmarks/dlmc_bench.py            # full grid (~1 h on 2 cores), resumable
    python benchmarks/dlmc_bench.py --quick    # 8 matrices, b=32, iso, fast methods (~30 s)

Runs every method on every usable matrix of ../shared/data/dlmc for each block size
(16, 32, 64), format (grid, shuffled) and budget (iso, iso=2: twice the nnz as block area).
The hypergraph partitioners (kahypar, mtkahypar) take 10-20x longer than the rest and run at
b=32 iso only unless --slow-everywhere. The Structure-LTH baseline runs once per matrix
(its own block area), and auto is run again at exactly that area for the comparison.

Outputs under benchmarks/results/ (or --out):
  dlmc_runs.csv    one row per run, appended as it finishes: rerunning skips what is there
  dlmc_lth.csv     Structure-LTH per matrix and auto at its area
  dlmc_summary.md  the tables printed at the end (ratios measured in this run)
  retained_by_pruning_<fmt>.png, retained_vs_time_<fmt>.png
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import regroup
from regroup import Budget, RegroupError, read_patterns, regroup_pattern
from regroup.provenance import tool_versions
from regroup.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DLMC = ROOT.parent / "shared" / "data" / "dlmc"
FAST = ["identity", "random", "sort", "hierarchical", "hierarchical:linkage=complete", "metis",
        "metis:graph=jaccard", "dsb", "auto"]
SLOW = ["mtkahypar", "kahypar"]
QUICK = ["identity", "sort", "hierarchical", "metis", "dsb", "auto"]
RUN_FIELDS = ["file", "model", "pruning", "rows", "cols", "nnz", "method", "format", "block",
              "budget", "retained", "retained_identity", "kept_blocks", "fill", "km1",
              "seconds"]
LTH_FIELDS = ["file", "model", "pruning", "rows", "cols", "nnz", "lth_retained", "lth_area",
              "lth_area_over_nnz", "lth_blocks", "lth_seconds", "auto_grid", "auto_shuffled"]


def _load(files):
    out, refused = [], []
    for f in files:
        try:
            (pat,), _ = read_patterns(f)
            out.append((f, pat))
        except RegroupError as exc:
            refused.append(str(exc))
    return out, refused


def _done(path: Path, keys) -> set:
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {tuple(r[k] for k in keys) for r in csv.DictReader(f)}


def _append(path: Path, fields, row) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


def _meta(f: Path, pat) -> dict:
    rel = f.relative_to(DLMC)
    return {"file": str(rel), "model": rel.parts[0], "pruning": rel.parts[1],
            "rows": pat.n_rows, "cols": pat.n_cols, "nnz": pat.nnz}


def _jobs(patterns, methods, blocks, formats, budgets, slow_everywhere):
    for block in blocks:
        for fmt in formats:
            for budget in budgets:
                for method in methods:
                    if method in SLOW and not slow_everywhere and (block, budget) != ("32",
                                                                                      "iso"):
                        continue
                    for f, pat in patterns:
                        yield f, pat, method, fmt, block, budget


def run_grid(patterns, args, out: Path) -> None:
    from tqdm import tqdm
    path = out / "dlmc_runs.csv"
    keys = ("file", "method", "format", "block", "budget")
    done = _done(path, keys)
    jobs = [j for j in _jobs(patterns, args.methods, args.blocks, args.formats, args.budgets,
                             args.slow_everywhere)
            if (str(j[0].relative_to(DLMC)), j[2], j[3], j[4], j[5]) not in done]
    for f, pat, method, fmt, block, budget in tqdm(jobs, desc="runs", file=sys.stderr,
                                                   disable=not jobs):
        if min(pat.n_rows, pat.n_cols) < int(block):
            continue
        t0 = time.perf_counter()
        r = regroup_pattern(pat, block=int(block), format=fmt, method=method, budget=budget,
                            seed=0)
        m = r.metrics
        _append(path, RUN_FIELDS, {**_meta(f, pat), "method": method, "format": fmt,
                                   "block": block, "budget": budget,
                                   "retained": m["retained"],
                                   "retained_identity": m["retained_identity"],
                                   "kept_blocks": m["kept_blocks"], "fill": m["fill"],
                                   "km1": m["km1"], "seconds": time.perf_counter() - t0})


def run_lth(patterns, out: Path) -> None:
    from tqdm import tqdm

    from regroup.structure_lth import structure_lth
    path = out / "dlmc_lth.csv"
    done = _done(path, ("file",))
    todo = [(f, p) for f, p in patterns if (str(f.relative_to(DLMC)),) not in done]
    for f, pat in tqdm(todo, desc="structure-lth", file=sys.stderr, disable=not todo):
        t0 = time.perf_counter()
        lth = structure_lth(pat, seed=0)
        secs = time.perf_counter() - t0
        row = {**_meta(f, pat), "lth_retained": lth.retained, "lth_area": lth.area,
               "lth_area_over_nnz": lth.area / pat.nnz, "lth_blocks": lth.kernel_blocks,
               "lth_seconds": secs}
        for fmt in ("grid", "shuffled"):
            if lth.area == 0:
                row[f"auto_{fmt}"] = 0.0          # no area: nothing can be kept
                continue
            r = regroup_pattern(pat, block=32, format=fmt, method="auto", seed=0,
                                budget=Budget("density", lth.area / lth.mask.size))
            row[f"auto_{fmt}"] = r.metrics["retained"]
        _append(path, LTH_FIELDS, row)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def summarize(out: Path, args) -> str:
    rows = _read(out / "dlmc_runs.csv")
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
             f"{os.cpu_count()} cores; regroup {regroup.__version__}; "
             + ", ".join(f"{k} {v}" for k, v in tool_versions().items() if v and k != "regroup")
             + ". Seed 0.\n"]
    by = defaultdict(list)
    for r in rows:
        by[(r["format"], str(int(r["block"])), r["budget"])].append(r)
    for (fmt, block, budget), rs in sorted(by.items()):
        base = {r["file"]: r["retained"] for r in rs if r["method"] == "identity"}
        dsb = {r["file"]: r["retained"] for r in rs if r["method"] == "dsb"}
        table = []
        for method in dict.fromkeys(r["method"] for r in rs):
            mr = [r for r in rs if r["method"] == method]
            ret = np.array([r["retained"] for r in mr])
            ide = np.array([base.get(r["file"], np.nan) for r in mr])
            ds = np.array([dsb.get(r["file"], np.nan) for r in mr])
            table.append({
                "method": method, "matrices": len(mr), "mean retained": float(ret.mean()),
                "x identity": float(ret.mean() / np.nanmean(ide)) if base else None,
                "x dsb": float(ret.mean() / np.nanmean(ds)) if dsb else None,
                "below identity": int(np.sum(ret < ide - 1e-12)),
                "total s": float(sum(r["seconds"] for r in mr))})
        lines.append(f"\n### {fmt}, b={block}, budget {budget}\n")
        lines.append(markdown_table(table, list(table[0])))
    if (out / "dlmc_lth.csv").exists():
        lth = _read(out / "dlmc_lth.csv")
        live = [r for r in lth if r["lth_area"] > 0]
        lines.append("\n### Structure-LTH at its own block area (b=32 for auto)\n")
        table = [{"matrices": f"{len(live)} with blocks ({len(lth) - len(live)} without)",
                  "LTH retained": float(np.mean([r["lth_retained"] for r in live])),
                  "LTH area / nnz": float(np.mean([r["lth_area_over_nnz"] for r in live])),
                  "auto grid": float(np.mean([r["auto_grid"] for r in live])),
                  "auto shuffled": float(np.mean([r["auto_shuffled"] for r in live])),
                  "shuffled - LTH": float(np.mean([r["auto_shuffled"] - r["lth_retained"]
                                                   for r in live])),
                  "grid - LTH": float(np.mean([r["auto_grid"] - r["lth_retained"]
                                               for r in live])),
                  "LTH s": float(sum(r["lth_seconds"] for r in lth))}]
        lines.append(markdown_table(table, list(table[0])))
    return "\n".join(lines) + "\n"


def plot(out: Path) -> None:
    from matplotlib.figure import Figure   # no pyplot: no global backend switch
    rows = [r for r in _read(out / "dlmc_runs.csv")
            if int(r["block"]) == 32 and r["budget"] == "iso"]
    for fmt in ("grid", "shuffled"):
        rs = [r for r in rows if r["format"] == fmt]
        if not rs:
            continue
        methods = list(dict.fromkeys(r["method"] for r in rs))
        prunings = sorted({f"{r['model']}/{r['pruning']}" for r in rs})
        fig = Figure(figsize=(13, 5))
        ax = fig.subplots()
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            vals = [np.mean([r["retained"] for r in rs if r["method"] == method
                             and f"{r['model']}/{r['pruning']}" == p] or [np.nan])
                    for p in prunings]
            ax.bar(np.arange(len(prunings)) + i * width, vals, width, label=method)
        ax.set_xticks(np.arange(len(prunings)) + 0.4, prunings, rotation=20, ha="right",
                      fontsize=8)
        ax.set_ylabel("mean retained (b=32, iso)")
        ax.set_title(f"DLMC, {fmt} format: retained per method and pruning method")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(out / f"retained_by_pruning_{fmt}.png", dpi=110)
        fig = Figure(figsize=(7, 5))
        ax = fig.subplots()
        for method in methods:
            mr = [r for r in rs if r["method"] == method]
            ax.scatter(sum(r["seconds"] for r in mr), np.mean([r["retained"] for r in mr]))
            ax.annotate(method, (sum(r["seconds"] for r in mr),
                                 np.mean([r["retained"] for r in mr])), fontsize=7)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("total seconds over all matrices (2 cores)")
        ax.set_ylabel("mean retained (b=32, iso)")
        ax.set_title(f"DLMC, {fmt}: retained vs time")
        fig.tight_layout()
        fig.savefig(out / f"retained_vs_time_{fmt}.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 matrices, b=32, iso, fast methods (CI smoke)")
    ap.add_argument("--methods", default=None, help="comma-separated method specs")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--formats", default="grid,shuffled")
    ap.add_argument("--budgets", default="iso,iso=2")
    ap.add_argument("--slow-everywhere", action="store_true",
                    help="run kahypar and mtkahypar at every block size and budget")
    ap.add_argument("--no-lth", action="store_true", help="skip the Structure-LTH baseline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not DLMC.is_dir():
        print(f"DLMC data not found at {DLMC}", file=sys.stderr)
        return 1
    files = sorted(DLMC.rglob("*.smtx"))
    if args.quick:
        files = files[::14]
        args.blocks, args.budgets = "32", "iso"
        args.methods = args.methods or ",".join(QUICK)
        args.out = str(Path(args.out) / "quick")
    args.methods = args.methods.split(",") if args.methods else FAST + SLOW
    args.blocks = args.blocks.split(",")
    args.formats = args.formats.split(",")
    args.budgets = args.budgets.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    patterns, refused = _load(files)
    print(f"{len(files)} files, {len(patterns)} usable", file=sys.stderr)
    for r in refused:
        print(f"refused: {r}", file=sys.stderr)
    run_grid(patterns, args, out)
    if not args.no_lth:
        run_lth(patterns, out)
    text = summarize(out, args)
    (out / "dlmc_summary.md").write_text(text)
    plot(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
