"""Block-sparse vs dense matmul on CPU: the modules of regroup.adapters.torch.sparse.

A 4096x4096 fp32 weight, batch 256, random regrouped layouts (random row and column
permutations, a random set of kept blocks) at b in {16, 32, 64} and block densities 5-50 %.
For each case: dense ``F.linear``; torch's CSR matmul of an unstructured mask with as many
nonzeros as the layouts keep (iso-nnz: the exact pruned model at the same number of kept
weights, ``torch.mm(W_csr, x.T).T``, the fastest CSR form on CPU); the BSR path of the grid
module and of the shuffled module (its gathered column tiles); and what ``backend="auto"``
dispatches to (measured on its first call); all timed in this run. "grid BSR vs CSR" is
the CSR time over the grid BSR time (above 1: the regrouped blocks beat the exact
unstructured kernel at the same number of weights). Prints a table and writes
benchmarks/results/kernel_bench.{csv,md}.

    python benchmarks/kernel_bench.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from regroup.blocks import Budget, build_layout, layout_mask
from regroup.result import LayerResult
from regroup.adapters.torch import BlockSparseLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import write_outputs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def layout(n: int, m: int, b: int, density: float, fmt: str, rng) -> LayerResult:
    """A random layout keeping ``density`` of the b x b blocks (as a LayerResult)."""
    P, Q = n // b, m // b
    mass = rng.random((n, m))
    row_perm, col_perm = rng.permutation(n), rng.permutation(m)
    import scipy.sparse as sp
    lay = build_layout(sp.csr_matrix(mass), row_perm, col_perm, (b, b), fmt,
                       Budget("blocks", round(density * P * Q)), n * m)
    return LayerResult(name=f"bench b={b} d={density}", shape=(n, m), mask=layout_mask(lay),
                       row_perm=lay.row_perm, col_perm=lay.col_perm,
                       panel_cols=lay.panel_cols, block_shape=(b, b), format=fmt,
                       method="random")


def unstructured_csr(W: torch.Tensor, nnz: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` masked by ``nnz`` positions drawn uniformly without replacement: the dense
    masked matrix and its CSR tensor (exactly ``nnz`` stored entries, zeros included;
    indices valid by construction)."""
    n, m = W.shape
    flat = np.sort(np.argpartition(rng.random(n * m), nnz - 1)[:nnz])
    rows, cols = flat // m, flat % m
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    values = W.reshape(-1)[torch.from_numpy(flat)]
    Wm = torch.zeros_like(W).view(-1).index_put_((torch.from_numpy(flat),), values).view(n, m)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols), values,
                                      size=(n, m), check_invariants=False)
    return Wm, csr


def timeit(fns: dict, reps: int) -> dict:
    """Best-of-``reps`` seconds of each function, run round-robin so that load on the
    machine during the case hits every path alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one block size, two densities")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = m = 4096
    batch = 256
    blocks = (32,) if args.quick else (16, 32, 64)
    densities = (0.1, 0.5) if args.quick else (0.05, 0.1, 0.2, 0.3, 0.5)
    rng = np.random.default_rng(0)
    csr_rng = np.random.default_rng(1)      # its own stream: the layouts stay as before
    W = torch.randn(n, m)
    x = torch.randn(batch, m)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight {n}x{m}, "
          f"batch {batch}, fp32, best of {args.reps}")
    with torch.no_grad():
        for b in blocks:
            for d in densities:
                rec = {"block": b, "density": d}
                fns = {"dense": lambda: F.linear(x, W)}
                # The CSR baseline keeps as many weights as the blocks (b*b each).
                nnz = round(d * (n // b) * (m // b)) * b * b
                Wu, Wcsr = unstructured_csr(W, nnz, csr_rng)
                fns["csr"] = lambda Wcsr=Wcsr: torch.mm(Wcsr, x.t().contiguous()).t()
                rec["csr_nnz"] = int(Wcsr.values().numel())
                ref = F.linear(x, Wu)
                rec["csr_relerr"] = float((fns["csr"]() - ref).abs().max() / ref.abs().max())
                for fmt in ("grid", "shuffled"):
                    res = layout(n, m, b, d, fmt, rng)
                    Wm = W * torch.from_numpy(res.mask)
                    rec[f"{fmt}_nnz"] = int(res.mask.sum())
                    mod = BlockSparseLinear(res, Wm, backend="bsr")
                    auto = BlockSparseLinear(res, Wm, backend="auto")
                    y = auto(x)                   # first call measures and dispatches
                    rec[f"{fmt}_maxerr"] = float((y - F.linear(x, Wm)).abs().max())
                    rec[f"{fmt}_auto"] = next(iter(auto.dispatch_log.values()))
                    fns[f"{fmt}_bsr"] = lambda mod=mod: mod(x)
                    fns[f"{fmt}_auto_run"] = lambda auto=auto: auto(x)
                t = timeit(fns, args.reps)
                rec["dense_ms"] = 1e3 * t["dense"]
                rec["csr_ms"] = 1e3 * t["csr"]
                rec["csr_speedup"] = t["dense"] / t["csr"]
                rec["grid_vs_csr"] = t["csr"] / t["grid_bsr"]
                for fmt in ("grid", "shuffled"):
                    rec[f"{fmt}_ms"] = 1e3 * t[f"{fmt}_bsr"]
                    rec[f"{fmt}_speedup"] = t["dense"] / t[f"{fmt}_bsr"]
                    rec[f"{fmt}_auto_speedup"] = t["dense"] / t[f"{fmt}_auto_run"]
                rows.append(rec)
                print(f"b={b:2d} density={d:4.2f}  dense {rec['dense_ms']:7.2f} ms | csr "
                      f"{rec['csr_ms']:7.2f} ms ({rec['csr_speedup']:.2f}x) | grid bsr "
                      f"{rec['grid_ms']:7.2f} ms ({rec['grid_speedup']:.2f}x) auto->"
                      f"{rec['grid_auto']} {rec['grid_auto_speedup']:.2f}x | shuffled bsr "
                      f"{rec['shuffled_ms']:7.2f} ms ({rec['shuffled_speedup']:.2f}x) auto->"
                      f"{rec['shuffled_auto']} {rec['shuffled_auto_speedup']:.2f}x", flush=True)
    lines = ["| b | block density | dense ms | CSR ms (iso-nnz) | CSR / dense | grid BSR ms | "
             "BSR / dense | auto (grid) | auto / dense | shuffled BSR ms | BSR / dense | "
             "auto (shuffled) | auto / dense | grid BSR vs CSR |", "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['density']:.2f} | {r['dense_ms']:.1f} | {r['csr_ms']:.1f} | "
            f"{r['csr_speedup']:.2f}x | {r['grid_ms']:.1f} | "
            f"{r['grid_speedup']:.2f}x | {r['grid_auto']} | {r['grid_auto_speedup']:.2f}x | "
            f"{r['shuffled_ms']:.1f} | {r['shuffled_speedup']:.2f}x | {r['shuffled_auto']} | "
            f"{r['shuffled_auto_speedup']:.2f}x | {r['grid_vs_csr']:.2f}x |")
    write_outputs(args.out, "kernel_bench" + ("_quick" if args.quick else ""), rows, lines)
    worst = min(min(r["grid_auto_speedup"], r["shuffled_auto_speedup"]) for r in rows)
    print(f"worst dispatched/dense ratio: {worst:.2f}x (target >= 0.95x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
