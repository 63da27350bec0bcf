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
    python benchmarks/nm_bench.py --windows --nm 2:4   # 24-column windows solved exactly
    python benchmarks/nm_bench.py --jobs 2             # matrices in two processes

``--models`` runs :func:`regroup.adapters.torch.regroup_model` with ``format="nm"`` on the
dense models (MobileNetV2's 1x1 convolutions and classifier; MiniLM's encoder Linear
layers, ``--layers``), once with ``mode="runtime"`` (every layer its own searched order,
gathered at run time) and once with ``mode="fold"`` (one order per hidden dimension,
searched on its consumers together and folded into its producers: no gather): the kept
``|w|`` of both against plain N:M, how many layers fold, CPU seconds.

``--windows`` solves windows of each matrix exactly (the first <= 96 rows, columns 0-23
and 24-47; :func:`regroup.nm.nm_optimum`) and reports each search's share of the optimal
gain over plain N:M.

Searches run on one BLAS thread, so that CPU seconds compare them.

Results: ``results/nm_bench.{csv,md}`` (or ``nm_bench_quick``); ``--models``:
``results/nm_models.{csv,md}``; ``--windows``: ``results/nm_windows.{csv,md}``.
"""
from __future__ import annotations

import argparse
import multiprocessing
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


def minilm_matrices(layers: int | None, first: int = 0) -> dict[str, np.ndarray]:
    """|w| of the 2-D encoder weights of MiniLM's layers ``first .. layers - 1``."""
    model, _ = zoo.minilm(layers)
    return {name: p.detach().abs().double().numpy()
            for name, p in model.named_parameters()
            if name.startswith("encoder.") and p.ndim == 2
            and int(name.split(".")[2]) >= first}


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
    ap.add_argument("--first-layer", type=int, default=0,
                    help="MiniLM's first layer searched (with --layers: a range)")
    ap.add_argument("--tag", default="", help="results/nm_bench_TAG.{csv,md}")
    ap.add_argument("--nm", nargs="+", default=["2:4", "1:4", "4:8"])
    ap.add_argument("--asp-escapes", type=int, default=100)
    ap.add_argument("--kicks", type=int, default=None,
                    help="regroup's kicks (default: nm_search's)")
    ap.add_argument("--no-asp", action="store_true", help="regroup and plain only")
    ap.add_argument("--jobs", type=int, default=1,
                    help="matrices searched in this many processes (CPU seconds are "
                         "per search either way)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", action="store_true",
                    help="whole models through regroup_model: fold vs runtime orders")
    ap.add_argument("--window-cols", type=int, default=None, help="--windows' width (24)")
    ap.add_argument("--windows", action="store_true",
                    help="24-column windows solved exactly: each search's share of the "
                         "optimal gain")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    patterns = [check_nm(v, "nm_bench.py", "--nm") for v in args.nm]
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and (args.models or args.windows):
        ap.error("--jobs applies to the per-matrix comparison, not to --models or --windows")
    if args.models:
        return models_main(args, patterns)
    mats: dict[str, np.ndarray] = {}
    if args.model in ("minilm", "all"):
        mats.update({f"minilm/{k}": v for k, v in
                     minilm_matrices(1 if args.quick else args.layers,
                                     0 if args.quick else args.first_layer).items()})
    if args.model in ("mobilenet", "all"):
        mats.update({f"mobilenet_v2/{k}": v for k, v in mobilenet_matrices().items()})
    if args.quick:
        firsts = [k for model in ("minilm/", "mobilenet_v2/")
                  for k in [k for k in mats if k.startswith(model)][:2]]
        mats = {k: mats[k][:64, :64] for k in firsts}
        args.asp_escapes = 2
    if args.windows:
        return windows_main(args, patterns, mats)
    tasks = [(name, A, (n, m), args) for (n, m) in patterns for name, A in mats.items()
             if A.shape[1] % m == 0]
    jobs = min(args.jobs, len(tasks))
    if jobs > 1:
        # largest first, so that the pool does not end on one long search; rows come back
        # in the table's order
        order = sorted(range(len(tasks)), key=lambda k: -tasks[k][1].size)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            done = dict(zip(order, pool.imap(_matrix_row, [tasks[k] for k in order])))
        rows = [done[k] for k in range(len(tasks))]
    else:
        rows = [_matrix_row(task) for task in tasks]
    lines = _tables(rows)
    stem = "nm_bench_quick" if args.quick else "nm_bench"
    write_outputs(args.out, f"{stem}_{args.tag}" if args.tag else stem, rows, lines)
    print("\n".join(lines))
    return 0


def _matrix_row(task: tuple[str, np.ndarray, tuple[int, int], Any]) -> dict:
    """One matrix and pattern: plain, ceiling, and each search's kept |w|, gain, efficacy
    and CPU seconds. Searches run on one BLAS thread: process time then compares them
    (ASP's search does no matrix products; regroup's does)."""
    from threadpoolctl import threadpool_limits

    name, A, (n, m), args = task
    plain = nm_retained(A, (n, m))
    ceiling = row_topk_retained(A, (n, m))
    row = {"nm": f"{n}:{m}", "matrix": name, "shape": "x".join(map(str, A.shape)),
           "plain": round(plain, 3), "ceiling": round(ceiling, 3)}
    searches = [("regroup", nm_search, {} if args.kicks is None else {"kicks": args.kicks})]
    if m <= 4 and not args.no_asp:
        searches.append(("asp", asp_search, {"escape_attempts": args.asp_escapes}))
    with threadpool_limits(1):
        for label, search, kwargs in searches:
            t0 = time.process_time()
            r = search(A, (n, m), seed=args.seed, **kwargs)
            row[f"{label} kept"] = round(r.retained, 3)
            row[f"{label} gain"] = round(r.retained - plain, 3)
            row[f"{label} efficacy"] = round(efficacy(r.retained, plain, ceiling), 4)
            row[f"{label} cpu s"] = round(time.process_time() - t0, 2)
    print(row, flush=True)
    return row


def windows_main(args, patterns: list[tuple[int, int]], mats: dict[str, np.ndarray]) -> int:
    """Windows small enough to solve exactly (the first <= 96 rows, columns 0-23 and
    24-47 of every matrix that wide): each search's gain over plain N:M against the
    optimum's (:func:`regroup.nm.nm_optimum`), summed over the windows."""
    from regroup import RegroupError
    from regroup.nm import nm_optimum

    cols = 24 if args.window_cols is None else args.window_cols
    rows, lines = [], []
    unsolved: list[str] = []
    for n, m in patterns:
        if cols % m:
            continue
        for name, A in mats.items():
            for w in range(2):
                if A.shape[1] < (w + 1) * cols:
                    continue
                W = A[:96, w * cols:(w + 1) * cols]
                try:
                    best = nm_optimum(W, (n, m), max_subsets=1_000_000, time_limit=300)
                except RegroupError as exc:     # too many subsets, or HiGHS out of time
                    unsolved.append(f"{n}:{m} {name} window {w}: {exc}")
                    print(f"no optimum: {unsolved[-1]}", flush=True)
                    continue
                row = {"nm": f"{n}:{m}", "matrix": name, "window": w,
                       "shape": "x".join(map(str, W.shape)), "plain": round(best.plain, 4),
                       "optimal gain": round(best.retained - best.plain, 4)}
                searches = [("regroup", nm_search,
                             {} if args.kicks is None else {"kicks": args.kicks})]
                if m <= 4 and not args.no_asp:
                    searches.append(("asp", asp_search,
                                     {"escape_attempts": args.asp_escapes}))
                for label, search, kwargs in searches:
                    r = search(W, (n, m), seed=args.seed, **kwargs)
                    row[f"{label} gain"] = round(r.retained - r.plain, 4)
                rows.append(row)
                print(row, flush=True)
        sub = [r for r in rows if r["nm"] == f"{n}:{m}"]
        if not sub:
            continue
        opt = sum(r["optimal gain"] for r in sub)
        if opt <= 0:
            lines += [f"### {n}:{m}: no window gains over plain N:M", ""]
            continue
        lines += [f"### {n}:{m}, {len(sub)} windows of {cols} columns", "",
                  "| search | share of the summed optimal gain | windows at the optimum |",
                  "|---|---|---|"]
        for label in ("regroup", "asp"):
            if f"{label} gain" in sub[0]:
                at = sum(r[f"{label} gain"] >= r["optimal gain"] - 1e-6 for r in sub)
                lines.append(f"| {label} | {sum(r[f'{label} gain'] for r in sub) / opt:.4f} | "
                             f"{at}/{len(sub)} |")
        lines.append("")
    if unsolved:
        lines += [f"Windows left out (no exact optimum): {len(unsolved)}", ""] + \
            [f"- {u}" for u in unsolved] + [""]
    print("\n".join(lines))
    if not rows:
        print("nm_bench.py --windows: no window could be solved exactly; nothing written",
              file=sys.stderr)
        return 1
    stem = "nm_windows_quick" if args.quick else "nm_windows"
    write_outputs(args.out, f"{stem}_{args.tag}" if args.tag else stem, rows, lines)
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
