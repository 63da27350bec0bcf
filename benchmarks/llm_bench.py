"""A synthetic 7B-parameter decoder checkpoint, regrouped whole: time, speed-up, memory.

Per decoder layer the shapes of a 7B LLaMA-style model: q/k/v/o 4096x4096, gate/up
11008x4096, down 4096x11008 (32 layers in the full model). Weights are magnitude-like
(normal entries scaled by log-normal row and column factors, sigma 0.3, seeded per
tensor), magnitude-pruned to the sparsity, stored as fp16 safetensors, one shard per
decoder layer plus a model.safetensors.index.json, in a temporary directory.

Each configuration runs ``regroup_checkpoint`` (``--method``, default auto; b=32, grid) in a
fresh process: serial (BLAS on every core), serial with one BLAS thread (one core: the
unit a worker gets), ``--jobs 2`` worker processes, and a local dask.distributed cluster of
2 workers.
Reported: wall time, mean per-layer time, peak resident memory of the largest process
(a worker or the parent), the speed-up over the serial run and over the one-core run
(the scaling with workers: 2.0x is linear for 2 workers); the result files of all
configurations are checked byte-identical.

    python benchmarks/llm_bench.py [--layers 1] [--sparsities 0.9,0.5] [--method auto] [--quick]

``--layers 32`` is the full 7B model (224 matrices, 13 GB of fp16 shards; with auto about
1.5 hours per sparsity serially on 2 cores, so the full-model run uses ``--method metis``).
``--quick`` (CI) uses one layer scaled down 8x. Tables go to ``results/llm_bench[_<L>layers]
[_<method>].md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import write_outputs  # noqa: E402

from regroup.provenance import file_sha256  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECTIONS = (("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096),
               ("self_attn.v_proj", 4096, 4096), ("self_attn.o_proj", 4096, 4096),
               ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
               ("mlp.down_proj", 4096, 11008))

RUN = r'''
import json, resource, sys, time
from regroup.pipeline import regroup_checkpoint
ckpt, out, jobs, engine, method = sys.argv[1:3] + [int(sys.argv[3])] + sys.argv[4:6]
t = time.perf_counter()
rep = regroup_checkpoint(ckpt, out, block=32, method=method, jobs=jobs, engine=engine).report()
wall = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
secs = [l["seconds"] for l in rep["layers"]]
print(json.dumps({"wall_s": wall, "layer_s": sum(secs) / len(secs), "peak_gb": peak,
                  "matrices": len(secs), "retained": rep["total"]["retained"],
                  "retained_identity": rep["total"]["retained_identity"]}))
'''


def make_checkpoint(root: str, layers: int, sparsity: float, scale: int) -> str:
    from regroup.io import write_safetensors
    ckpt = os.path.join(root, f"llm-{sparsity}")
    os.makedirs(ckpt)
    weight_map = {}
    for layer in range(layers):
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {}
        for j, (proj, n, m) in enumerate(PROJECTIONS):
            n, m = n // scale, m // scale
            rng = np.random.default_rng([layer, j])
            w = rng.standard_normal((n, m), dtype=np.float32)
            w *= rng.lognormal(0, 0.3, n).astype(np.float32)[:, None]
            w *= rng.lognormal(0, 0.3, m).astype(np.float32)[None, :]
            k = int(sparsity * n * m)
            w[np.abs(w) < np.partition(np.abs(w).ravel(), k)[k]] = 0
            name = f"model.layers.{layer}.{proj}.weight"
            tensors[name] = w.astype(np.float16)
            weight_map[name] = shard
        write_safetensors(tensors, os.path.join(ckpt, shard))
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return ckpt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (full model: 32)")
    ap.add_argument("--sparsities", default="0.9,0.5")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 layer scaled 8x down")
    ap.add_argument("--method", default="auto",
                    help="partitioner (default auto; e.g. metis for a quick full-model run)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    scale = 8 if args.quick else 1
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.quick:
        sparsities = sparsities[:1]
    one_core = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    configs = (("serial", 1, "local", {}), ("serial, 1 core", 1, "local", one_core),
               ("jobs 2", 2, "local", {}), ("dask, 2 workers", 2, "dask", {}))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for sp in sparsities:
            t = time.perf_counter()
            ckpt = make_checkpoint(root, args.layers, sp, scale)
            print(f"sparsity {sp}: {args.layers} layer(s) written in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            outputs = []
            for label, jobs, engine, env in configs:
                out = os.path.join(root, f"out-{sp}-{len(outputs)}.npz")
                proc = subprocess.run([sys.executable, "-c", RUN, ckpt, out, str(jobs), engine,
                                       args.method],
                                      capture_output=True, text=True, env={**os.environ, **env})
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
                rec.update({"sparsity": sp, "config": label, "layers": args.layers,
                            "scale": scale, "method": args.method})
                rows.append(rec)
                outputs.append(file_sha256(out))
                os.remove(out)
                rec["speedup"] = rows[-len(outputs)]["wall_s"] / rec["wall_s"]
                print(f"  {label:16s} {rec['wall_s']:7.1f} s wall, {rec['layer_s']:5.1f} s "
                      f"per matrix, peak {rec['peak_gb']:.2f} GB, speed-up "
                      f"{rec['speedup']:.2f}x", flush=True)
            same = all(o == outputs[0] for o in outputs)
            for r in rows[-len(outputs):]:
                r["identical"] = same
                r["scaling"] = rows[-len(outputs) + 1]["wall_s"] / r["wall_s"]
            print(f"  result files identical across configurations: {same}")
            if not same:
                return 1
    lines = ["| sparsity | method | configuration | matrices | wall s | s per matrix | peak GB | "
             "speed-up | vs 1 core | retained | identity | identical |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['sparsity']} | {r['method']} | {r['config']} | {r['matrices']} | "
                     f"{r['wall_s']:.1f} "
                     f"| {r['layer_s']:.1f} | {r['peak_gb']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['scaling']:.2f}x | "
                     f"{r['retained']:.4f} | {r['retained_identity']:.4f} | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    stem = "llm_bench" + (f"_{args.layers}layers" if args.layers != 1 else "")
    stem += f"_{args.method}" if args.method != "auto" else ""
    write_outputs(args.out, stem + ("_quick" if args.quick else ""), rows, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
