"""N:M column permutations on real weights: plain, the ASP baseline, regroup (issue 14).

For every matrix - all-MiniLM-L6-v2's 2-D encoder weights (q, k, v, attention output,
FFN in and out of each layer) and MobileNetV2's 1x1 convolutions and classifier
(torchvision's ImageNet weights) - and each N:M pattern, side by side in one run:

- ``plain``     N:M of the weight as it is (the identity order)
- ``asp``       :func:`regroup.nm.asp_search`, the channel-permutation search of NVIDIA
                ASP (Pool & Yu, NeurIPS'21) re-implemented from its paper (stripe-pair
                exhaustive splits + ``--asp-escapes`` random channel-swap escapes; ASP
                itself does 2:4 only, here every M <= 4)
- ``regroup``   :func:`regroup.nm.nm_search`

Reported: kept ``|w|``, the gain over plain, efficacy (the share of the gap to the per-row
unstructured ceiling closed: a loose ceiling, see the issue), CPU seconds. Matrices whose
column count is not a multiple of M are skipped (none of these).

    python benchmarks/nm_bench.py                      # all matrices, 2:4, 1:4, 4:8
    python benchmarks/nm_bench.py --model minilm --layers 1 --nm 2:4
    python benchmarks/nm_bench.py --quick              # smoke run (CI, slow marker)

Results: ``results/nm_bench.{csv,md}`` (or ``nm_bench_quick``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import zoo  # noqa: E402
from _tables import write_outputs  # noqa: E402

from regroup.nm import (asp_search, check_nm, efficacy, nm_retained,  # noqa: E402
                        nm_search, row_topk_retained)


def minilm_matrices(layers: int | None) -> dict[str, np.ndarray]:
    model, _ = zoo.minilm(layers)
    return {name: p.detach().abs().double().numpy()
            for name, p in model.named_parameters()
            if name.startswith("encoder.") and p.ndim == 2}


def mobilenet_matrices() -> dict[str, np.ndarray]:
    model = zoo.mobilenet_v2()
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 4 and p.shape[2:] == (1, 1) or name == "classifier.1.weight":
            out[name] = p.detach().abs().double().reshape(p.shape[0], -1).numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("minilm", "mobilenet", "all"), default="all")
    ap.add_argument("--layers", type=int, default=None, help="MiniLM layers (default all 6)")
    ap.add_argument("--nm", nargs="+", default=["2:4", "1:4", "4:8"])
    ap.add_argument("--asp-escapes", type=int, default=100)
    ap.add_argument("--kicks", type=int, default=8, help="regroup's kicks (nm_search)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    patterns = [check_nm(v, "nm_bench.py", "--nm") for v in args.nm]
    mats: dict[str, np.ndarray] = {}
    if args.model in ("minilm", "all"):
        mats.update({f"minilm/{k}": v for k, v in
                     minilm_matrices(1 if args.quick else args.layers).items()})
    if args.model in ("mobilenet", "all"):
        mats.update({f"mobilenet_v2/{k}": v for k, v in mobilenet_matrices().items()})
    if args.quick:
        firsts = [k for model in ("minilm/", "mobilenet_v2/")
                  for k in [k for k in mats if k.startswith(model)][:2]]
        mats = {k: mats[k][:64, :64] for k in firsts}
        args.asp_escapes = 2
    rows = []
    for (n, m) in patterns:
        for name, A in mats.items():
            if A.shape[1] % m:
                continue
            plain = nm_retained(A, (n, m))
            ceiling = row_topk_retained(A, (n, m))
            row = {"nm": f"{n}:{m}", "matrix": name, "shape": "x".join(map(str, A.shape)),
                   "plain": round(plain, 3), "ceiling": round(ceiling, 3)}
            searches = [("regroup", nm_search, {"kicks": args.kicks})]
            if m <= 4:
                searches.append(("asp", asp_search, {"escape_attempts": args.asp_escapes}))
            for label, search, kwargs in searches:
                t0 = time.process_time()
                r = search(A, (n, m), seed=args.seed, **kwargs)
                row[f"{label} kept"] = round(r.retained, 3)
                row[f"{label} gain"] = round(r.retained - plain, 3)
                row[f"{label} efficacy"] = round(efficacy(r.retained, plain, ceiling), 4)
                row[f"{label} cpu s"] = round(time.process_time() - t0, 2)
            rows.append(row)
            print(row, flush=True)
    lines = _tables(rows)
    write_outputs(args.out, "nm_bench_quick" if args.quick else "nm_bench", rows, lines)
    print("\n".join(lines))
    return 0


def _tables(rows: list[dict]) -> list[str]:
    lines = []
    for nm in dict.fromkeys(r["nm"] for r in rows):
        sub = [r for r in rows if r["nm"] == nm]
        asp = all("asp gain" in r for r in sub)
        lines += [f"### {nm}", "",
                  "| model | matrices | plain | regroup gain | efficacy | cpu s |"
                  + (" asp gain | efficacy | cpu s | regroup >= asp | gain ratio | time "
                     "ratio |" if asp else ""),
                  "|---|---|---|---|---|---|" + ("---|" * 6 if asp else "")]
        for model in dict.fromkeys(r["matrix"].split("/")[0] for r in sub):
            rs = [r for r in sub if r["matrix"].startswith(model + "/")]
            tot = {k: sum(r[k] for r in rs) for k in rs[0] if k.endswith(("gain", "cpu s"))
                   or k == "plain"}
            eff = np.mean([r["regroup efficacy"] for r in rs])
            line = (f"| {model} | {len(rs)} | {tot['plain']:.1f} | {tot['regroup gain']:.2f} | "
                    f"{eff:.3f} | {tot['regroup cpu s']:.1f} |")
            if asp:
                wide = [r for r in rs if int(r["shape"].split("x")[1]) >= 64]
                ok = sum(r["regroup gain"] >= r["asp gain"] - 1e-6 for r in wide)
                line += (f" {tot['asp gain']:.2f} | "
                         f"{np.mean([r['asp efficacy'] for r in rs]):.3f} | "
                         f"{tot['asp cpu s']:.1f} | {ok}/{len(wide)} | "
                         f"{tot['regroup gain'] / max(tot['asp gain'], 1e-12):.3f} | "
                         f"{tot['regroup cpu s'] / max(tot['asp cpu s'], 1e-12):.3f} |")
            lines.append(line)
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
