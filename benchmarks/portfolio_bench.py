"""Is auto the best of its refined portfolio? (every DLMC matrix, b=32, iso, both formats)

    python benchmarks/portfolio_bench.py               # ~10 min: auto + each member refined
    python benchmarks/portfolio_bench.py --time-only   # auto alone, timed (~2 min)
    python benchmarks/portfolio_bench.py --quick       # CI smoke: 4 matrices

For every usable matrix of ``../shared/data/dlmc`` and each format, auto is run, then every
member of its portfolio as a direct run with refinement on (``method=m, refine=True``).
The table counts the matrices where auto retains less than some refined member (the
target is 0), and compares auto with the layout the previous auto kept - the member that
was best BEFORE refinement, refined - whose retained is read off auto's own metrics
(``candidates`` and ``candidates_refined``), so both come from one run.

``--time-only`` times auto alone over every matrix: run it with ``PYTHONPATH`` pointing at
another checkout to time that version of auto on the same machine, side by side.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DLMC = os.path.join(HERE, "..", "..", "shared", "data", "dlmc")
B = 32


def load(root: str, quick: bool):
    import regroup
    from regroup.io.smtx import read_smtx
    paths = sorted(glob.glob(os.path.join(root, "*", "*", "*", "*.smtx")))
    if quick:
        paths = paths[::max(1, len(paths) // 4)][:4]
    out = []
    for p in paths:
        pat = regroup.from_sparse(read_smtx(p), name=os.path.relpath(p, root))
        if 0 < pat.nnz < pat.n_rows * pat.n_cols and min(pat.shape[:2]) >= B:
            out.append(pat)
    return out


def time_auto(patterns, formats) -> dict:
    from regroup import regroup_pattern
    out = {}
    for fmt in formats:
        t0 = time.perf_counter()
        retained = [regroup_pattern(p, block=B, format=fmt, method="auto").metrics["retained"]
                    for p in patterns]
        out[fmt] = {"seconds": time.perf_counter() - t0,
                    "mean_retained": float(np.mean(retained)), "matrices": len(patterns)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DLMC)
    ap.add_argument("--formats", default="grid,shuffled")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"no DLMC data at {args.data}", file=sys.stderr)
        return 1
    patterns = load(args.data, args.quick)
    formats = args.formats.split(",")
    if args.time_only:
        print(json.dumps(time_auto(patterns, formats)))
        return 0

    from regroup import regroup_pattern
    from regroup.partitioners.auto import PORTFOLIO
    rows, lines = [], []
    for fmt in formats:
        worse, gaps, auto_r, prev_r, secs, auto_s = 0, [], [], [], [], 0.0
        for pat in patterns:
            t0 = time.perf_counter()
            a = regroup_pattern(pat, block=B, format=fmt, method="auto")
            auto_s += time.perf_counter() - t0
            m = a.metrics
            direct = {c: regroup_pattern(pat, block=B, format=fmt, method=c,
                                         refine=True).metrics["retained"] for c in PORTFOLIO}
            best = max(direct.values())
            worse += m["retained"] < best - 1e-12
            gaps.append(m["retained"] - best)
            pre_winner = max(m["candidates"], key=m["candidates"].get)
            auto_r.append(m["retained"])
            prev_r.append(m["candidates_refined"][pre_winner])
            secs.append(time.perf_counter() - t0)
            rows.append({"matrix": pat.name, "format": fmt, "auto": m["retained"],
                         "chosen": m["chosen"], "best_refined_member": best,
                         "previous_auto": m["candidates_refined"][pre_winner],
                         **{f"refined:{c}": v for c, v in direct.items()}})
        lines.append(
            f"| {fmt} | {len(patterns)} | {worse} | {min(gaps):+.4f} | "
            f"{np.mean(auto_r):.4f} | {np.mean(prev_r):.4f} | "
            f"{np.mean(auto_r) / np.mean(prev_r):.4f} | "
            f"{sum(a > p + 1e-12 for a, p in zip(auto_r, prev_r))} | {auto_s:.1f} |")
    table = "\n".join([
        "| format | matrices | auto below a refined member | min (auto - best refined "
        "member) | auto mean retained | previous auto (best-before-refinement, refined) "
        "| ratio | matrices improved | auto s (all matrices) |",
        "|---|---|---|---|---|---|---|---|---|", *lines])
    print(table)
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    with open(os.path.join(args.out, f"portfolio{suffix}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, f"portfolio{suffix}.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
