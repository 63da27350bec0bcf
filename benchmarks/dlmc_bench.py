"""Benchmark every partitioner on the DLMC matrices in ../shared/data/dlmc.

    python benchmarks/dlmc_bench.py            # all 108 matrices, every partitioner
    python benchmarks/dlmc_bench.py --quick    # 8 matrices, the fast partitioners

For each format (grid, shuffled) it runs each method at block 32x32, iso-density, seed 0,
writes one CSV row per (matrix, method) to benchmarks/results/dlmc_<format>.csv and prints
a Markdown table: mean retained, ratio to identity measured in the same run, layers where
the method beats identity, and total seconds. The auto row's total seconds is the
"all matrices with auto" wall time.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from regroup import RegroupError, read_patterns, regroup_pattern
from regroup.compare import COLUMNS
from regroup.report import markdown_table, write_csv

ROOT = Path(__file__).resolve().parents[1]
DLMC = ROOT.parent / "shared" / "data" / "dlmc"
METHODS = ["identity", "random", "sort", "hierarchical", "hierarchical:linkage=complete",
           "metis", "metis:graph=jaccard", "mtkahypar", "kahypar", "auto"]
QUICK_METHODS = ["identity", "sort", "hierarchical", "metis", "auto"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 matrices, fast methods (CI smoke)")
    ap.add_argument("--methods", default=None, help="comma-separated method specs")
    ap.add_argument("--formats", default="grid,shuffled")
    ap.add_argument("--block", default="32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not DLMC.is_dir():
        print(f"DLMC data not found at {DLMC}", file=sys.stderr)
        return 1
    files = sorted(DLMC.rglob("*.smtx"))
    if args.quick:
        files = files[::14]
    methods = args.methods.split(",") if args.methods else (
        QUICK_METHODS if args.quick else METHODS)
    os.makedirs(args.out, exist_ok=True)
    patterns, refused = [], []
    for f in files:
        try:
            (pat,), _ = read_patterns(f)
            patterns.append((f, pat))
        except RegroupError as exc:
            refused.append(str(exc))
    print(f"# DLMC benchmark: {len(files)} files, {len(patterns)} usable, block {args.block}, "
          f"iso-density, seed 0; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    for r in refused:
        print(f"refused: {r}")
    for fmt in args.formats.split(","):
        rows = []
        for method in methods:
            t_method = time.perf_counter()
            for f, pat in patterns:
                t0 = time.perf_counter()
                r = regroup_pattern(pat, block=args.block, format=fmt, method=method, seed=0)
                m = r.metrics
                rows.append({"file": str(f.relative_to(DLMC)), "layer": pat.name,
                             "rows": pat.n_rows, "cols": pat.n_cols, "nnz": pat.nnz,
                             "method": method, "format": fmt, "block": args.block, "seed": 0,
                             "retained": m["retained"],
                             "retained_identity": m["retained_identity"],
                             "ratio_identity": (m["retained"] / m["retained_identity"]
                                                if m["retained_identity"] else None),
                             "kept_blocks": m["kept_blocks"], "fill": m["fill"],
                             "km1": m["km1"], "seconds": time.perf_counter() - t0})
            print(f"  {fmt:8s} {method:32s} {time.perf_counter() - t_method:7.1f} s",
                  file=sys.stderr)
        write_csv(rows, COLUMNS, Path(args.out) / f"dlmc_{fmt}{'_quick' if args.quick else ''}.csv")
        ident = {r["file"]: r["retained"] for r in rows if r["method"] == "identity"}
        table = []
        for method in methods:
            rs = [r for r in rows if r["method"] == method]
            ret = np.array([r["retained"] for r in rs])
            base = np.array([ident[r["file"]] for r in rs])
            table.append({
                "method": method,
                "mean retained": float(ret.mean()),
                "mean identity": float(base.mean()),
                "ratio of means": float(ret.mean() / base.mean()),
                "beats identity": f"{int((ret > base + 1e-12).sum())}/{len(rs)}",
                "below identity": int((ret < base - 1e-12).sum()),
                "mean km1": float(np.mean([r["km1"] for r in rs])),
                "total s": float(sum(r["seconds"] for r in rs)),
            })
        print(f"\n## format {fmt}\n")
        print(markdown_table(table, list(table[0])))
        by_model = {}
        for r in rows:
            if r["method"] in ("identity", "auto"):
                key = "/".join(r["file"].split("/")[:2])
                by_model.setdefault(key, {}).setdefault(r["method"], []).append(r["retained"])
        print(f"\nauto vs identity by model / pruning method ({fmt}):\n")
        print(markdown_table([{"model/pruning": k, "identity": float(np.mean(v["identity"])),
                               "auto": float(np.mean(v["auto"])),
                               "ratio": float(np.mean(v["auto"]) / np.mean(v["identity"]))}
                              for k, v in sorted(by_model.items())
                              if "auto" in v and "identity" in v],
                             ["model/pruning", "identity", "auto", "ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
