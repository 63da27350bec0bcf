"""Which of auto's candidates need refining? (every DLMC matrix, b=32, iso, both formats)

    python benchmarks/portfolio_bench.py               # auto on every matrix (~6 min)
    python benchmarks/portfolio_bench.py --time-only   # auto timed, nothing recorded
    python benchmarks/portfolio_bench.py --columns     # grid columns: clustering or not
    python benchmarks/portfolio_bench.py --quick       # CI smoke: 4 matrices

Refinement can reorder auto's candidates: a lower start may climb higher. auto finishes
EVERY candidate (full column step and refinement - what a direct ``method=m,
refine=True`` run gives) and keeps the best. The default mode runs it, records each
candidate's score before and after refinement, and replays cheaper policies on those
numbers: refine only the best 1, 2, 3 or 4 candidates by their score before refinement.
Per policy: mean retained, and the matrices where it retains less than the best refined
candidate ("misses"); auto itself must have none.

``--columns`` (grid) runs auto as it is beside auto with the profile clustering of the
columns (regroup.columns) put back before refinement, side by side in one run.

``--time-only`` times auto as it is over every matrix: run it with ``PYTHONPATH``
pointing at another checkout to time that version on the same machine, side by side.
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


POLICIES = ("best 1", "best 2", "best 3", "best 4", "all 6 (auto)")


def finalists(policy: str) -> int:
    """How many candidates ``policy`` refines."""
    return int(policy.split()[1])


def columns_study(patterns) -> list[str]:
    """Grid: auto as it is against auto with the columns' profile clustering before
    refinement (what auto did before), one after the other on each matrix."""
    import regroup.engine as engine
    from regroup import regroup_pattern
    plain = engine.group_columns
    totals = {"as is": [0.0, []], "profile clustering, then refinement": [0.0, []]}
    for pat in patterns:
        for variant, acc in totals.items():
            if variant != "as is":
                engine.group_columns = lambda *a, **k: plain(*a, **{**k, "cluster": True})
            try:
                t0 = time.perf_counter()
                r = regroup_pattern(pat, block=B, format="grid", method="auto")
                acc[0] += time.perf_counter() - t0
                acc[1].append(r.metrics["retained"])
            finally:
                engine.group_columns = plain
    base = np.array(totals["as is"][1])
    lines = ["| grid columns before refinement | seconds | mean retained | "
             "matrices where it retains more / less than as is |", "|---|---|---|---|"]
    for variant, (sec, ret) in totals.items():
        ret = np.array(ret)
        lines.append(f"| {variant} | {sec:.0f} | {ret.mean():.4f} | "
                     f"{int((ret > base + 1e-12).sum())} / {int((ret < base - 1e-12).sum())} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DLMC)
    ap.add_argument("--formats", default="grid,shuffled")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--columns", action="store_true")
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

    if args.columns:
        table = "\n".join(columns_study(patterns))
        print(table)
        return _write(args, "portfolio_columns", table, None)

    from regroup import regroup_pattern
    rows, lines = [], []
    for fmt in formats:
        for pat in patterns:
            t0 = time.perf_counter()
            m = regroup_pattern(pat, block=B, format=fmt, method="auto").metrics
            rows.append({"matrix": pat.name, "format": fmt, "shape": pat.shape[:2],
                         "seconds": time.perf_counter() - t0, "retained": m["retained"],
                         "before": m["candidates"], "after": m["candidates_refined"]})
    for fmt in formats:
        rs = [r for r in rows if r["format"] == fmt]
        best = [max(r["after"].values()) for r in rs]
        for policy in POLICIES:
            got = []
            for r in rs:
                ranked = sorted(r["before"], key=lambda c: -r["before"][c])
                got.append(max(r["after"][c] for c in ranked[:finalists(policy)]))
            misses = sum(g < b - 1e-12 for g, b in zip(got, best))
            lines.append(f"| {fmt} | {policy} | {np.mean(got):.4f} | {misses} of {len(rs)} | "
                         f"{max(b - g for g, b in zip(got, best)):.4f} |")
        auto_misses = sum(r["retained"] < b - 1e-12 for r, b in zip(rs, best))
        lines.append(f"| {fmt} | auto's own result: {np.mean([r['retained'] for r in rs]):.4f}"
                     f" in {sum(r['seconds'] for r in rs):.0f} s | | {auto_misses} of "
                     f"{len(rs)} | |")
    table = "\n".join(["| format | candidates refined | mean retained | retains less than "
                       "the best refined candidate | largest shortfall |",
                       "|---|---|---|---|---|", *lines])
    print(table)
    return _write(args, "portfolio", table, rows)


def _write(args, stem: str, table: str, rows) -> int:
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if rows is not None:
        with open(os.path.join(args.out, f"{stem}{suffix}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, f"{stem}{suffix}.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
