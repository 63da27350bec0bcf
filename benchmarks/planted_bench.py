"""Planted block structure: how close does each method get to the hidden layout?

    python benchmarks/planted_bench.py

Masks from ``regroup.synthetic.planted_mask`` (seed 1): a share of the 32x32 blocks is
filled to ``fill``, the rest kept with probability ``noise``, rows and columns shuffled.
The oracle is the hidden layout's retained under the same format and iso budget.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from regroup import from_array, regroup_pattern
from regroup.synthetic import oracle_retained, planted_mask

CONFIGS = [  # rows, cols, planted block share, fill, noise
    (512, 512, 0.10, 0.9, 0.01), (1024, 1024, 0.05, 0.8, 0.02), (512, 2048, 0.08, 0.7, 0.03),
    (256, 1024, 0.15, 0.95, 0.005), (2048, 512, 0.10, 0.6, 0.05), (1024, 4096, 0.03, 0.9, 0.01),
]
METHODS = ["identity", "dsb", "hierarchical", "metis", "auto"]


def main() -> int:
    print("| shape | blocks planted | fill | noise | format | oracle | "
          + " | ".join(METHODS) + " | auto - oracle | auto s |")
    print("|" + "---|" * (7 + len(METHODS) + 1))
    diffs = []
    for n, m, share, fill, noise in CONFIGS:
        pl = planted_mask(n, m, block=32, block_density=share, fill=fill, noise=noise, seed=1)
        pat = from_array(pl.weight != 0)
        for fmt in ("grid", "shuffled"):
            oracle = oracle_retained(pl, block=32, format=fmt)
            vals, secs = {}, 0.0
            for method in METHODS:
                t0 = time.perf_counter()
                vals[method] = regroup_pattern(pat, block=32, format=fmt,
                                               method=method).metrics["retained"]
                secs = time.perf_counter() - t0
            diffs.append(vals["auto"] - oracle)
            print(f"| {n}x{m} | {share} | {fill} | {noise} | {fmt} | {oracle:.4f} | "
                  + " | ".join(f"{vals[k]:.4f}" for k in METHODS)
                  + f" | {vals['auto'] - oracle:+.4f} | {secs:.1f} |")
    print(f"\nauto - oracle: min {min(diffs):+.4f}, mean {np.mean(diffs):+.4f} over "
          f"{len(diffs)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
