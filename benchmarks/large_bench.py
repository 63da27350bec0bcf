"""Large matrices: a 4096 x 11008 weight (an LLM MLP down-projection's shape) at 50 % and
90 % sparsity, regrouped with auto at b=32 in both formats.

    python benchmarks/large_bench.py [--sparsities 0.5,0.9] [--formats grid,shuffled]

Weights are magnitude-like: standard normal entries scaled by log-normal row and column
factors (sigma 0.3, as outlier channels do), magnitude-pruned to the sparsity (seed 0).
Each case runs in a fresh process so that its peak resident memory (ru_maxrss) is its own;
the time is that of ``regroup_pattern`` alone (generation and conversion are reported
apart).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASE = r'''
import json, resource, sys, time
import numpy as np
import regroup
n, m, sparsity, fmt = 4096, 11008, float(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
t0 = time.perf_counter()
w = rng.standard_normal((n, m), dtype=np.float32)
w *= rng.lognormal(0, 0.3, n).astype(np.float32)[:, None]
w *= rng.lognormal(0, 0.3, m).astype(np.float32)[None, :]
k = int(sparsity * n * m)
w[np.abs(w) < np.partition(np.abs(w).ravel(), k)[k]] = 0
pat = regroup.from_array(w, name="mlp.down_proj.weight")
del w
t1 = time.perf_counter()
r = regroup.regroup_pattern(pat, block=32, format=fmt, method="auto", seed=0)
t2 = time.perf_counter()
print(json.dumps({"sparsity": sparsity, "format": fmt, "nnz": pat.nnz,
                  "prepare_s": t1 - t0, "regroup_s": t2 - t1,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "retained": r.metrics["retained"],
                  "retained_magnitude": r.metrics["retained_magnitude"],
                  "retained_identity": r.metrics["retained_identity"],
                  "chosen": r.metrics["chosen"], "refine_gain": r.metrics["refine_gain"]}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5,0.9")
    ap.add_argument("--formats", default="grid,shuffled")
    args = ap.parse_args(argv)
    rows = []
    for s in args.sparsities.split(","):
        for fmt in args.formats.split(","):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CASE, s, fmt], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  sparsity {s} {fmt}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print("| sparsity | format | nnz | regroup s | peak GB | retained | retained |w| | "
          "identity | chosen | refine gain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']} | {r['format']} | {r['nnz']} | {r['regroup_s']:.1f} | "
              f"{r['peak_gb']:.2f} | {r['retained']:.4f} | {r['retained_magnitude']:.4f} | "
              f"{r['retained_identity']:.4f} | {r['chosen']} | {r['refine_gain']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
