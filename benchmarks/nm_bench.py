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
    python benchmarks/nm_bench.py --models             # whole models: folded vs own orders

``--models`` runs :func:`regroup.adapters.torch.regroup_model` with ``format="nm"`` on the
dense models (MobileNetV2's 1x1 convolutions and classifier; MiniLM's encoder Linear
layers, ``--layers``), once with ``mode="runtime"`` (every layer its own searched order,
gathered at run time) and once with ``mode="fold"`` (one order per hidden dimension,
searched on its consumers together and folded into its producers: no gather): the kept
``|w|`` of both against plain N:M, how many layers fold, CPU seconds.

Results: ``results/nm_bench.{csv,md}`` (or ``nm_bench_quick``); ``--models``:
``results/nm_models.{csv,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from typing import Any

import numpy as np
from torch import nn

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
    ap.add_argument("--models", action="store_true",
                    help="whole models through regroup_model: fold vs runtime orders")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    patterns = [check_nm(v, "nm_bench.py", "--nm") for v in args.nm]
    if args.models:
        return models_main(args, patterns)
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


def _model_cases(args) -> list[tuple[str, Any, tuple, str | list[str]]]:
    """(label, factory of the dense model, example inputs, layers) per model."""
    cases = []
    if args.model in ("mobilenet", "all"):
        ones = [f"{n}.weight" for n, m in zoo.mobilenet_v2().named_modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
        cases.append(("mobilenet_v2", zoo.mobilenet_v2, (zoo.photo_crops(1, size=64),),
                      [*ones, "classifier.1.weight"]))
    if args.model in ("minilm", "all"):
        layers = 1 if args.quick else args.layers
        _, tokenizer = zoo.minilm(1)
        ids = tokenizer(["N:M groups run along the input columns."],
                        return_tensors="pt")["input_ids"]
        cases.append(("minilm", lambda: zoo.minilm(layers)[0], (ids,), "encoder.*"))
    return cases


def models_main(args, patterns: list[tuple[int, int]]) -> int:
    import warnings

    from regroup.adapters.torch import regroup_model
    rows = []
    for label, make, inputs, layers in _model_cases(args):
        for n, m in patterns:
            row = {"model": label, "nm": f"{n}:{m}"}
            for mode in ("runtime", "fold"):
                model = make()
                totals = {name: float(p.detach().abs().sum())
                          for name, p in model.named_parameters()}
                t0 = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")        # "could not trace BertModel"
                    plan = regroup_model(model, format="nm", nm=(n, m), mode=mode,
                                         example_inputs=inputs, layers=layers,
                                         seed=args.seed,
                                         time_limit=1.0 if args.quick else None)
                seconds = time.process_time() - t0
                plain, got = (sum(r.metrics[key] * totals[name]
                                  for name, r in plan.layers.items())
                              for key in ("retained_magnitude_identity", "retained_magnitude"))
                row.update({"layers": len(plan.layers), "plain": round(plain, 2),
                            f"{mode} kept": round(got, 2), f"{mode} cpu s": round(seconds, 1)})
                if mode == "fold":
                    row["folded"] = sum(s["cols"] == "fold" for s in plan.sides.values())
            row["fold / runtime gain"] = round(
                (row["fold kept"] - row["plain"]) / max(row["runtime kept"] - row["plain"],
                                                        1e-12), 3)
            rows.append(row)
            print(row, flush=True)
    lines = ["| model | N:M | layers | folded | plain | runtime kept | fold kept | "
             "fold gain / runtime gain | runtime cpu s | fold cpu s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['nm']} | {r['layers']} | {r['folded']} | {r['plain']} | "
              f"{r['runtime kept']} | {r['fold kept']} | {r['fold / runtime gain']} | "
              f"{r['runtime cpu s']} | {r['fold cpu s']} |" for r in rows]
    write_outputs(args.out, "nm_models_quick" if args.quick else "nm_models", rows, lines)
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
