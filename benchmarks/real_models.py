"""Real pretrained models end to end: prune, block, recover, compare (issue 12's targets).

For each model, sparsity and block size, every method gets the SAME block area per layer
and the same recovery (knowledge distillation from the dense model, block masks fixed,
``regroup.adapters.torch.recover``):

- ``unstructured``    the pruned model itself (the quality to approach; not block-sparse)
- ``naive blocks``    regroup with ``method="identity"``: the best blocks of the pruned
                      mask in the original order, refilled
- ``block magnitude`` the best b x b blocks of the DENSE weight by L1 norm, as many per
                      layer as auto keeps (no unstructured step, no permutation)
- ``dsb``             regroup with DSB's grouping (runtime orders)
- ``auto``            ``regroup_model``'s defaults: regroup's portfolio, then every layer
                      planned again with the weights of features its neighbours' kept
                      blocks do not use scaled down (``chain="auto"``, 0.01 here: the
                      model is traced on the example input); runtime orders (``--fold``
                      folds them)
- ``auto per-layer``  auto with ``chain=None``: each layer planned on its own (``--methods``;
                      what ``auto`` was in the results before 2026-12-02)
- ``auto |w|``        auto ranking blocks by |w| alone (no calibration; chain on as in
                      ``auto`` since 2026-12-02; ``--methods``)
- ``block magnitude x act``  block magnitude on |w| x input norm (``--methods``)

``--seeds`` repeats everything per seed (the recovery data, dropout and regroup's seed;
the evaluation data stays fixed) and the tables pair the methods by seed.

With calibration (the default; ``--no-calibration`` turns it off), naive blocks, dsb and
auto rank blocks by ``|w_ij| * ||x_j||`` (``regroup_model(calibration=...)``, input norms
measured once on the dense model with the recovery batches, as Wanda does).

Fidelity to the dense model, before and after recovery:

- MobileNetV2 (torchvision's ImageNet weights), 1x1 convs and classifier pruned by global
  L1: top-1 agreement with the dense model on random crops of the colour photographs
  bundled in wheels (``zoo.photos``: scikit-learn's, matplotlib's, scikit-image's; ``--eval``
  crops, other seeds than the ``--train`` crops).
- BERT (all-MiniLM-L6-v2), every encoder Linear pruned per layer by L1: cosine of the
  mean-pooled, normalised sentence embeddings to the dense model's, on English sentences
  from the standard library's docstrings (split into recovery and evaluation sets); its
  embedding tables (not pruned) stay frozen in recovery (``--train-embeddings`` trains them).

    python benchmarks/real_models.py                       # both models, all settings
    python benchmarks/real_models.py --model mobilenet --sparsities 0.9 --steps 60
    python benchmarks/real_models.py --quick               # smoke run (CI, slow marker)

Speed (unless ``--no-speed``): after the runs, auto's plan of the first seed of each
configuration is applied to a fresh dense model and timed in the main process on one
torch thread (best of ``--speed-reps`` forward passes of one batch of ``--speed-batch``,
the models taken in turn: MobileNetV2 crops at ``--size``, MiniLM sentences padded to the
batch's longest):
the dense model, and the block-sparse models of ``to_block_sparse`` with backend "auto"
(each layer timed once per input class and kept dense unless a sparse path beat it by
5 %) and "bsr" (every planned layer on torch's BSR product).

Results: ``results/real_models.{csv,md}`` (or ``real_models_quick``), the speed table in
``results/real_models_speed.csv``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn.utils import prune

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import zoo  # noqa: E402
from _tables import write_outputs  # noqa: E402

from regroup.blocks import build_layout, layout_mask  # noqa: E402

from regroup import Budget  # noqa: E402
from regroup.adapters.torch import (BlockSparseConv2d, BlockSparseLinear,  # noqa: E402
                                    Plan, input_scales, layer_masks, recover,
                                    regroup_model, teacher_outputs, to_block_sparse,
                                    write_mask)

BLOCK_MODULES = (BlockSparseLinear, BlockSparseConv2d)
METHODS = ("unstructured", "naive blocks", "block magnitude", "block magnitude x act", "dsb",
           "auto", "auto |w|", "auto per-layer")


# -- pruning and blocking ----------------------------------------------------------------
def pointwise(model: nn.Module) -> list[nn.Module]:
    """MobileNetV2's 1x1 convs and classifier (the layers issue 12 prunes)."""
    return [m for m in model.modules()
            if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)
            or isinstance(m, nn.Linear)]


def encoder_linears(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and n.startswith("encoder.")]


def block_magnitude(model: nn.Module, counts: dict[str, int], block: int,
                    scales: dict | None = None) -> None:
    """Mask each layer to its ``counts[name]`` best b x b blocks of its dense weight by L1
    norm (of |w| x input norm with ``scales``): regroup's own block selection
    (``build_layout``) in the identity order, under a ``blocks=k`` budget."""
    for name, m in model.named_modules():
        key = name + ".weight"
        if key not in counts:
            continue
        w = m.weight.detach().reshape(m.weight.shape[0], -1).abs().double()
        if scales is not None and key in scales:
            w = w * scales[key]
        w = w.numpy()
        n, k = w.shape
        lay = build_layout(sp.csr_matrix(w), np.arange(n), np.arange(k), (block, block),
                           "grid", Budget.parse(f"blocks={counts[key]}"))
        write_mask(m, "weight", torch.from_numpy(layout_mask(lay)).reshape(m.weight.shape))


def make_variant(dense: nn.Module, layers, method: str, sparsity: float, block: int,
                 example, fold: bool, counts: dict | None, global_l1: bool, seed: int = 0,
                 scales: dict | None = None):
    """(model, plan or None) for one method; ``global_l1`` ranks all layers' weights
    together (else each layer is pruned to ``sparsity``); ``scales`` (input norms) rank
    blocks by |w| x input norm."""
    model = copy.deepcopy(dense)
    chosen = layers(model)
    if method.startswith("block magnitude"):
        block_magnitude(model, counts, block, scales if method.endswith("x act") else None)
        return model, None
    params = [(m, "weight") for m in chosen]
    if global_l1:
        prune.global_unstructured(params, prune.L1Unstructured, amount=sparsity)
    else:
        for m, p in params:
            prune.l1_unstructured(m, p, amount=sparsity)
    if method == "unstructured":
        return model, None
    algo = {"naive blocks": "identity", "dsb": "dsb", "auto": "auto", "auto |w|": "auto",
            "auto per-layer": "auto"}[method]
    names = [n + ".weight" for n, m in model.named_modules() if any(m is c for c in chosen)]
    plan = regroup_model(model, block=block, method=algo, format="grid", layers=names,
                         mode="fold" if fold and algo == "auto" else "runtime",
                         example_inputs=example, seed=seed,
                         calibration=None if method == "auto |w|" else scales,
                         chain="auto" if algo == "auto" and method != "auto per-layer"
                         else None)
    return model, plan


def mask_metrics(model: nn.Module, dense: nn.Module, scales: dict) -> dict[str, float]:
    """What the final masks keep of the DENSE model, mean over the pruned layers: |w|,
    the activation-weighted score (|w_ij| ||x_j||)^2 (Wanda's, squared: the output energy
    of each weight on the calibration data), and the share of output rows / input columns
    left without any weight (dead features). Original coordinates: not for folded models."""
    masks = layer_masks(model)
    weights = dict(dense.named_parameters())
    acc: dict[str, list[float]] = {"kept |w|": [], "kept act^2": [], "dead rows": [],
                                   "dead cols": []}
    for name, s in scales.items():
        w = weights[name].detach().double()
        w = w.reshape(w.shape[0], -1).abs()
        mask = masks[name][1].reshape(w.shape).to(torch.float64)
        act2 = (w * s) ** 2
        acc["kept |w|"].append(float((w * mask).sum() / w.sum()))
        acc["kept act^2"].append(float((act2 * mask).sum() / act2.sum()))
        acc["dead rows"].append(float((mask.sum(1) == 0).double().mean()))
        acc["dead cols"].append(float((mask.sum(0) == 0).double().mean()))
    return {k: round(float(np.mean(v)), 4) for k, v in acc.items()}


# -- fidelity ----------------------------------------------------------------------------
@torch.no_grad()
def top1_agreement(model, dense_top1, crops, batch=64) -> float:
    model.eval()
    got = torch.cat([model(crops[i:i + batch]).argmax(-1) for i in range(0, len(crops), batch)])
    return float((got == dense_top1).float().mean())


@torch.no_grad()
def embedding_cosine(model, tok, sentences, dense_emb) -> float:
    model.eval()
    emb = zoo.sentence_embeddings(model, tok, sentences)
    return float((emb * dense_emb).sum(-1).mean())


def speeds(models: dict[str, nn.Module], inputs: dict, reps: int) -> dict[str, float]:
    """Best forward time of each model, seconds: one warm-up call each (backend "auto"
    times its paths there), then ``reps`` rounds timing every model in turn, so that a
    drift of the machine's speed (a shared VM's) reaches all of them alike."""
    best = dict.fromkeys(models, float("inf"))
    with torch.no_grad():
        for model in models.values():
            model.eval()(**inputs)
        for _ in range(reps):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(**inputs)
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def plan_file(plan_dir: str, meta: dict) -> str:
    return os.path.join(plan_dir, f"{meta['model']}_{meta['sparsity']}_{meta['block']}.plan")


def model_speed(args, configs) -> list[dict]:
    """Time the dense model against the block-sparse models of auto's saved plans (one
    torch thread; see the module docstring); ``configs`` are (model, sparsity, block)."""
    torch.set_num_threads(1)
    out = []
    for name, sparsity, block in configs:
        path = plan_file(args.plan_dir, {"model": name, "sparsity": sparsity, "block": block})
        if not os.path.exists(path):
            raise RuntimeError(f"speed stage: no plan of auto for {name} at sparsity "
                               f"{sparsity}, block {block} ({path}); its run saves one")
        plan = Plan.load(path)
        if name == "minilm":
            dense, tok = zoo.minilm()
            sentences = zoo.english_sentences(args.sentences)
            x = dict(tok(sentences[len(sentences) // 2:][:args.speed_batch], padding=True,
                         truncation=True, max_length=128, return_tensors="pt"))
        else:
            dense = zoo.mobilenet_v2()
            x = {"x": zoo.photo_crops(args.speed_batch, size=args.size, seed=2)}
        models = {"dense": dense}
        for backend in ("auto", "bsr"):
            bs = copy.deepcopy(dense)
            plan.apply(bs)
            to_block_sparse(bs, plan, backend=backend)
            models[backend] = bs
        t = speeds(models, x, args.speed_reps)
        # one path per block-sparse module and input class (one class here)
        paths = [p for m in models["auto"].modules() if isinstance(m, BLOCK_MODULES)
                 for p in m.dispatch_log.values()]
        row = {"model": name, "sparsity": sparsity, "block": block, "threads": 1,
               "batch": args.speed_batch, "layers": len(plan.layers),
               "auto_timed_layers": len(paths),
               "auto_sparse_layers": sum(p != "dense" for p in paths),
               **{f"{k}_ms": round(1e3 * v, 2) for k, v in t.items()},
               "speedup_auto": round(t["dense"] / t["auto"], 3),
               "speedup_bsr": round(t["dense"] / t["bsr"], 3)}
        out.append(row)
        print(row, flush=True)
    return out


def _speed_table(rows, lines) -> None:
    if not rows:
        return
    lines += ["### CPU speed of auto's block-sparse model (one torch thread)", "",
              "| model | sparsity | block | batch | dense ms | block-sparse ms (auto) | "
              "speed-up | layers on a sparse path | block-sparse ms (bsr) | speed-up (bsr) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sparsity']} | {r['block']} | {r['batch']} | "
                     f"{r['dense_ms']:.1f} | {r['auto_ms']:.1f} | "
                     f"{r['speedup_auto']:.2f}x | {r['auto_sparse_layers']} of "
                     f"{r['auto_timed_layers']} | {r['bsr_ms']:.1f} | "
                     f"{r['speedup_bsr']:.2f}x |")
    lines.append("")


# -- runs --------------------------------------------------------------------------------
def _variant_rows(args, seed, build, fidelity, recover_kw, dense, scales, meta, rows):
    """Build, measure, recover and measure every method of one configuration (one
    sparsity and block size, one seed); ``build(method, counts)`` -> (model, plan)."""
    counts = None
    for method in args.methods:
        if method.startswith("block magnitude") and counts is None:
            continue          # needs auto's per-layer block counts: auto runs first
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model, plan = build(method=method, counts=counts)
        folded = plan is not None and plan.mode == "fold"
        kept = {} if folded else mask_metrics(model, dense, scales)
        plan_s = time.perf_counter() - t0
        if plan is not None and method == "auto":
            counts = {n: int(r.metrics["kept_blocks"]) for n, r in plan.layers.items()}
        before = fidelity(model)
        log = recover(model, None, steps=args.steps, **recover_kw)
        after = fidelity(model)
        row = {**meta, "method": method, "seed": seed, "before": round(before, 4),
               "after": round(after, 4), "plan_s": round(plan_s, 1),
               "recover_s": round(log.seconds, 1), "steps": log.steps, **kept}
        if plan is not None:
            row["chain"] = plan.options.chain
            row["retained"] = round(float(np.mean([r.metrics["retained"]
                                                   for r in plan.layers.values()])), 4)
            row["folded_sides"] = sum(v == "fold" for s in plan.sides.values()
                                      for v in (s.get("rows"), s.get("cols")))
        if method == "auto" and args.plan_dir and seed == args.seeds[0]:
            plan.save(plan_file(args.plan_dir, meta))
        yield row, model, plan
        rows.append(row)
        print(row, flush=True)


def run_mobilenet(args, rows):
    dense = zoo.mobilenet_v2()
    evals = zoo.photo_crops(args.eval, size=args.size, seed=2)
    with torch.no_grad():
        dense_top1 = torch.cat([dense(evals[i:i + 64]).argmax(-1)
                                for i in range(0, len(evals), 64)])
    example = (evals[:1],)
    for seed in args.seeds:
        # training crops differ per seed (the evaluation crops never change)
        train = zoo.photo_crops(args.train, size=args.size, seed=1000 + seed)
        batches = [train[i:i + args.batch] for i in range(0, len(train), args.batch)]
        scales = _scales(args, dense, pointwise, batches)
        targets = teacher_outputs(dense, batches)       # the teacher runs once per batch
        kw = dict(data=batches, lr=args.lr_cnn, loss="kl", temperature=2.0,
                  train_mode=args.bn_train, targets=targets)
        for sparsity in args.sparsities:
            build = functools.partial(make_variant, dense, pointwise, sparsity=sparsity,
                                      block=16, example=example, fold=args.fold,
                                      global_l1=True, seed=seed,
                                      scales=scales if args.calibration else None)
            meta = {"model": "mobilenet_v2", "sparsity": sparsity, "block": 16,
                    "metric": "top-1 agreement"}
            for _ in _variant_rows(args, seed, build,
                                   lambda m: top1_agreement(m, dense_top1, evals), kw,
                                   dense, scales, meta, rows):
                pass


def _by_length(tok, sentences):
    """Sentences sorted by token count (batches pad to their longest: sorted, much less)."""
    lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=128)["input_ids"]]
    return [sentences[i] for i in np.argsort(lengths, kind="stable")]


def run_bert(args, rows):
    dense, tok = zoo.minilm()
    if not args.train_embeddings:
        # Not pruned, and half of the parameters (30522 x 384 words): recovery trains the
        # encoder (its Adam step and embedding gradient took ~30 % of each step).
        dense.embeddings.requires_grad_(False)
    sentences = zoo.english_sentences(args.sentences)
    half = len(sentences) // 2
    train, evals = sentences[:half], _by_length(tok, sentences[half:])
    with torch.no_grad():
        dense_emb = zoo.sentence_embeddings(dense, tok, evals)
    done_unstructured = set()
    for seed in args.seeds:
        # each seed shuffles the recovery sentences, then sorts each run of 8 batches by
        # length (little padding, different batches per seed)
        order = np.random.default_rng(seed).permutation(len(train))
        group = 8 * args.batch
        shuffled = [s for i in range(0, len(order), group)
                    for s in _by_length(tok, [train[j] for j in order[i:i + group]])]
        batches = [dict(tok(shuffled[i:i + args.batch], padding=True, truncation=True,
                            max_length=128, return_tensors="pt"))
                   for i in range(0, len(shuffled), args.batch)]
        example = (batches[0]["input_ids"][:2],)
        scales = _scales(args, dense, encoder_linears, batches)
        targets = teacher_outputs(dense, batches)
        kw = dict(data=batches, lr=args.lr_bert, targets=targets)
        for block in args.blocks:
            for sparsity in args.bert_sparsities:
                methods = args.methods
                if (sparsity, seed) in done_unstructured:    # the same model at every block
                    methods = [m for m in methods if m != "unstructured"]
                done_unstructured.add((sparsity, seed))
                build = functools.partial(make_variant, dense, encoder_linears,
                                          sparsity=sparsity, block=block, example=example,
                                          fold=args.fold, global_l1=False, seed=seed,
                                          scales=scales if args.calibration else None)
                meta = {"model": "minilm", "sparsity": sparsity, "block": block,
                        "metric": "embedding cosine"}
                sub = argparse.Namespace(**{**vars(args), "methods": methods})
                for _ in _variant_rows(sub, seed, build,
                                       lambda m: embedding_cosine(m, tok, evals, dense_emb),
                                       kw, dense, scales, meta, rows):
                    pass


def _task(job) -> list[dict]:
    """The rows of one (model, sparsity) of the run (every seed, block and method)."""
    args, (model, sparsity) = job
    rows: list[dict] = []
    if model == "bert":
        run_bert(argparse.Namespace(**{**vars(args), "bert_sparsities": [sparsity]}), rows)
    else:
        run_mobilenet(argparse.Namespace(**{**vars(args), "sparsities": [sparsity]}), rows)
    return rows


def _scales(args, dense, layers, batches):
    """Input norms of the pruned layers on the recovery batches: for ranking blocks
    (unless ``--no-calibration``) and for the kept-score columns."""
    names = [n + ".weight" for n, m in dense.named_modules() if any(m is c for c in layers(dense))]
    return input_scales(dense, batches, names)


STATS = ("retained", "kept |w|", "kept act^2", "dead rows", "dead cols", "before", "after",
         "recover_s")


def _table(rows, model, lines):
    """Per configuration and method: means over the seeds (after: mean +- sd), then auto's
    paired differences (same seed) to every other method."""
    rows = [r for r in rows if r["model"] == model]
    if not rows:
        return
    seeds = sorted({r["seed"] for r in rows})
    lines += [f"### {model} ({len(seeds)} seed{'s' * (len(seeds) > 1)}: "
              f"{', '.join(map(str, seeds))})", "",
              "| sparsity | block | method | mean retained | kept abs w | kept act^2 | "
              "dead rows | dead cols | before recovery | after | after sd | recovery s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    configs = sorted({(r["sparsity"], r["block"]) for r in rows})
    for sparsity, block in configs:
        here = [r for r in rows if (r["sparsity"], r["block"]) == (sparsity, block)
                or (r["method"] == "unstructured" and r["sparsity"] == sparsity)]
        for method in dict.fromkeys(r["method"] for r in here):
            mine = [r for r in here if r["method"] == method]
            mean = {k: _mean([r.get(k) for r in mine]) for k in STATS}
            sd = float(np.std([r["after"] for r in mine], ddof=1)) if len(mine) > 1 else None
            lines.append(f"| {sparsity} | {block} | {method.replace('|', chr(92) + '|')} | "
                         + " | ".join(_fmt(mean[k]) for k in STATS[:-1]) + " | "
                         + (_fmt(sd) if sd is not None else "") + f" | {mean['recover_s']:.1f} |")
    lines += ["", "auto's lead after recovery, paired by seed (mean; min and max over seeds):",
              "", "| sparsity | block | vs | mean | min | max |", "|---|---|---|---|---|---|"]
    for sparsity, block in configs:
        auto = {r["seed"]: r["after"] for r in rows if r["method"] == "auto"
                and (r["sparsity"], r["block"]) == (sparsity, block)}
        for method in dict.fromkeys(r["method"] for r in rows):
            if method == "auto":
                continue
            other = {r["seed"]: r["after"] for r in rows if r["method"] == method
                     and r["sparsity"] == sparsity
                     and (r["block"] == block or method == "unstructured")}
            diff = [auto[s] - other[s] for s in auto if s in other]
            if diff:
                lines.append(f"| {sparsity} | {block} | {method.replace('|', chr(92) + '|')} | "
                             f"{np.mean(diff):+.4f} | {min(diff):+.4f} | {max(diff):+.4f} |")
    lines.append("")


def _mean(values):
    values = [v for v in values if v not in (None, "")]
    return float(np.mean(values)) if values else None


def _fmt(v):
    return "" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mobilenet", "bert", "all"), default="all")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--bert-sparsities", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of " + ", ".join(METHODS) + " (default: the first five; "
                    "block magnitude needs auto)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="recovery data order, dropout and regroup's seed (paired)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112, help="crop size (MobileNetV2)")
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--sentences", type=int, default=1200)
    ap.add_argument("--lr-cnn", type=float, default=1e-3)
    ap.add_argument("--bn-eval", dest="bn_train", action="store_false",
                    help="recover MobileNetV2 with BatchNorm in eval mode (default: train)")
    ap.add_argument("--no-calibration", dest="calibration", action="store_false",
                    help="rank blocks by |w| alone (no input norms)")
    ap.add_argument("--lr-bert", type=float, default=1e-4)
    ap.add_argument("--train-embeddings", action="store_true",
                    help="MiniLM: recovery trains the embeddings too (default: frozen)")
    ap.add_argument("--fold", action="store_true", help="auto folds its orders")
    ap.add_argument("--no-speed", dest="speed", action="store_false",
                    help="skip timing auto's block-sparse models")
    ap.add_argument("--speed-reps", type=int, default=3,
                    help="timed forward passes per model (best of)")
    ap.add_argument("--speed-batch", type=int, default=8,
                    help="inputs per timed forward pass (crops or sentences)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes (each (model, sparsity) is a task; torch threads are "
                         "shared out among them)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick:
        args.sparsities, args.bert_sparsities, args.blocks = [0.9], [0.8], [32]
        args.steps, args.train, args.eval, args.sentences, args.size = 2, 16, 32, 64, 96
        args.batch = 8
        args.methods = args.methods or list(METHODS)
    unknown = set(args.methods or ()) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    if args.methods is not None and any(m.startswith("block magnitude") for m in args.methods) \
            and "auto" not in args.methods:
        ap.error("--methods: 'block magnitude' takes its block counts from 'auto'")
    if args.methods is not None:      # auto first: block magnitude needs its counts
        args.methods = sorted(dict.fromkeys(args.methods), key=lambda m: m != "auto")
    else:
        args.methods = ["unstructured", "auto", "naive blocks", "block magnitude", "dsb"]
    for flag in ("speed_reps", "speed_batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    t0 = time.perf_counter()
    if args.speed and "auto" not in args.methods:
        print("speed stage skipped: it times auto's plans and --methods has no auto",
              flush=True)
        args.speed = False
    plan_dir = tempfile.TemporaryDirectory() if args.speed else None
    args.plan_dir = plan_dir.name if plan_dir else None
    tasks = ([("bert", s) for s in args.bert_sparsities] if args.model in ("bert", "all")
             else []) + ([("mobilenet", s) for s in args.sparsities]
                         if args.model in ("mobilenet", "all") else [])
    jobs = min(args.jobs, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs > 1:
        # spawn: a forked child of a process that ran torch's thread pool can hang
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            done = pool.map(_task, [(args, t) for t in tasks], chunksize=1)
    else:
        done = [_task((args, t)) for t in tasks]
    rows, lines = [r for task_rows in done for r in task_rows], []
    speed_rows = []
    if plan_dir is not None:
        with plan_dir:
            speed_rows = model_speed(args, sorted({(r["model"], r["sparsity"], r["block"])
                                                   for r in rows}))
    _table(rows, "minilm", lines)
    _table(rows, "mobilenet_v2", lines)
    speed_lines: list[str] = []
    _speed_table(speed_rows, speed_lines)
    lines += speed_lines
    lines.append(f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min ({jobs} process"
                 f"{'es' * (jobs > 1)} of {threads} torch thread{'s' * (threads > 1)}); "
                 f"photographs: {', '.join(zoo.photos())}.")
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                  if k in rows[0] else 99)
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    stem = "real_models_quick" if args.quick else "real_models"
    write_outputs(args.out, stem, rows, lines)
    if speed_rows:
        write_outputs(args.out, stem + "_speed", speed_rows, speed_lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
