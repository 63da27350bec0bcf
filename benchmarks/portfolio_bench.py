"""Which of auto's candidates should be refined? (every DLMC matrix, b=32, iso, both formats)

    python benchmarks/portfolio_bench.py               # ~20 min: every candidate refined
    python benchmarks/portfolio_bench.py --time-only   # auto as it is, timed (~6 min)
    python benchmarks/portfolio_bench.py --quick       # CI smoke: 4 matrices

Refinement can reorder auto's candidates: a lower start may climb higher. The default
mode runs auto with EVERY candidate finished (full column step and refinement - what a
direct ``method=m, refine=True`` run gives; ``regroup.engine.FINALISTS`` is raised to the
portfolio size for this), records each candidate's score before and after refinement,
and replays the finalist policies on those numbers: refine only the best 1 (the previous
auto), 2, 3 or 4 candidates by their score before refinement, the policy auto uses (its
best ``FINALISTS``, every candidate on layers of at most ``ALL_FINALISTS_BELOW``
elements), or all of them. Per policy: mean retained, and the matrices where it retains
less than the best refined candidate ("misses").

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


POLICIES = ("best 1 (previous auto)", "best 2", "best 3", "best 4", "auto", "all 6")


def finalists(policy: str, shape: tuple[int, int]) -> int:
    """How many candidates ``policy`` refines on a matrix of ``shape``."""
    from regroup.engine import ALL_FINALISTS_BELOW, FINALISTS
    if policy == "auto":
        return 6 if shape[0] * shape[1] <= ALL_FINALISTS_BELOW else FINALISTS
    return int(policy.split()[1])


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

    import regroup.engine as engine
    from regroup import regroup_pattern
    from regroup.partitioners.auto import PORTFOLIO
    saved = engine.FINALISTS
    rows, lines = [], []
    try:
        engine.FINALISTS = len(PORTFOLIO)      # every candidate finished
        for fmt in formats:
            for pat in patterns:
                t0 = time.perf_counter()
                m = regroup_pattern(pat, block=B, format=fmt, method="auto").metrics
                rows.append({"matrix": pat.name, "format": fmt, "shape": pat.shape[:2],
                             "seconds": time.perf_counter() - t0, "before": m["candidates"],
                             "after": m["candidates_refined"]})
    finally:
        engine.FINALISTS = saved
    for fmt in formats:
        rs = [r for r in rows if r["format"] == fmt]
        best = [max(r["after"].values()) for r in rs]
        for policy in POLICIES:
            got = []
            for r in rs:
                k = finalists(policy, tuple(r["shape"]))
                ranked = sorted(r["before"], key=lambda c: -r["before"][c])[:k]
                got.append(max(r["after"][c] for c in ranked))
            misses = sum(g < b - 1e-12 for g, b in zip(got, best))
            name = (f"auto: best {engine.FINALISTS}, all up to {engine.ALL_FINALISTS_BELOW} "
                    "elements" if policy == "auto" else policy)
            lines.append(f"| {fmt} | {name} | {np.mean(got):.4f} | {misses} of {len(rs)} | "
                         f"{max(b - g for g, b in zip(got, best)):.4f} |")
        lines.append(f"| {fmt} | (all finished: seconds over all matrices) | "
                     f"{sum(r['seconds'] for r in rs):.0f} s | | |")
    table = "\n".join(["| format | candidates refined | mean retained | retains less than "
                       "the best refined candidate | largest shortfall |",
                       "|---|---|---|---|---|", *lines])
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
