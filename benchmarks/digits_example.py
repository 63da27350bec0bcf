"""IMP-Regroup end to end on scikit-learn's digits: accuracy and CPU inference time.

An MLP (64 -> 512 -> 512 -> 10) is trained on 70 % of the 1797 8x8 digits and tested on
the rest. Its two hidden layers are pruned by iterative magnitude pruning (global ranking,
rewinding to the initial weights after each round) to a target sparsity, with one of:

- ``IMP``             unstructured masks (the accuracy to match)
- ``IMP-Regroup grid``      every round the masks are regrouped by ``regroup`` (method
                            auto, grid format: row + column permutations) into refilled
                            16x16 blocks at iso area (block area <= surviving weights)
- ``IMP-Regroup shuffled``  the same, shuffled format (each row panel its own column tiles)
- ``naive blocks``    the same block budget without permutation (method identity)
- ``IMP-Refill``      channel refill (Structure-LTH's IMP-Refill): whole rows with the
                      most surviving |w| kept dense, as many as the budget allows

Accuracy is the mean (and spread) over seeds. Inference: the test set (540 rows) through
the final block model of seed 0, swapped to block-sparse modules
(``to_block_sparse``, backend auto) vs the dense model, best of 20 runs on this CPU.

    python benchmarks/digits_example.py [--quick] [--seeds 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regroup.adapters.torch import imp_regroup, to_block_sparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import write_outputs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "IMP": dict(regroup=False),
    "IMP-Regroup grid": dict(method="auto", format="grid"),
    "IMP-Regroup shuffled": dict(method="auto", format="shuffled"),
    "naive blocks": dict(method="identity", format="grid"),
    "IMP-Refill": dict(regroup=False, refill=True),
}
BLOCK = 16


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=seed,
                                          stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return (t(Xtr, torch.float32), t(ytr, torch.long), t(Xte, torch.float32),
            t(yte, torch.long))


class MLP(nn.Module):
    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def channel_refill(event: str, info: dict) -> None:
    """IMP-Refill: after each magnitude pruning, keep the rows with the largest surviving
    |w| whole, as many rows as the surviving count allows (iso area)."""
    if event != "pruned":
        return
    model = info["model"]
    with torch.no_grad():
        for m in (model.fc1, model.fc2):
            alive = m.weight_orig.abs() * m.weight_mask
            rows = int(m.weight_mask.sum().item() // m.weight.shape[1])
            keep = torch.zeros_like(m.weight_mask)
            keep[torch.argsort(-alive.sum(1), stable=True)[:rows]] = 1
            m.weight_mask.copy_(keep)
            m.weight = m.weight_orig * m.weight_mask


def run(variant: str, sparsity: float, seed: int, data, epochs: int, rounds: int,
        rewind_epochs: int, hidden: int = 512):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = MLP(hidden)

    def train(m, r, n_epochs=epochs):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        m.train()
        for _ in range(n_epochs):
            for idx in torch.randperm(len(Xtr), generator=g).split(128):
                opt.zero_grad()
                F.cross_entropy(m(Xtr[idx]), ytr[idx]).backward()
                opt.step()
        m.eval()

    def accuracy(m):
        with torch.no_grad():
            return float((m(Xte).argmax(1) == yte).float().mean())

    opts = dict(VARIANTS[variant])
    refill = opts.pop("refill", False)
    # Late rewinding (Frankle et al. 2020): the weights after a short warm-up, not init.
    train(model, -1, rewind_epochs)
    rewind = copy.deepcopy(model.state_dict())
    hist = imp_regroup(model, train, rounds=rounds, sparsity=sparsity, block=BLOCK,
                       rewind=rewind,
                       seed=seed, evaluate=accuracy, layers=["fc1.weight", "fc2.weight"],
                       mode="fold", chain=None,      # the published runs: per layer
                       example_inputs=(Xte[:2],),
                       callbacks=[channel_refill] if refill else (), **opts)
    return model, hist


def best_of(fn, reps: int = 20) -> float:
    with torch.no_grad():
        fn()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return min(t)


def inference(model: nn.Module, plan, X: torch.Tensor) -> dict:
    """Dense vs block-sparse time of a final model (``plan`` None: dense only)."""
    dense = MLP(model.fc1.out_features)
    dense.load_state_dict({k.replace("_orig", ""): v for k, v in model.state_dict().items()
                           if not k.endswith("_mask")})
    t_dense = best_of(lambda: dense(X))
    if plan is None:
        return {"dense_ms": 1e3 * t_dense, "block_ms": None, "backends": ""}
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(X)
        plan.fold(sparse)
        assert torch.allclose(sparse(X), ref, atol=1e-5), "folding changed the function"
    to_block_sparse(sparse, plan)
    with torch.no_grad():
        assert torch.allclose(sparse(X), ref, atol=1e-4), "block-sparse model differs"
    t_block = best_of(lambda: sparse(X))
    backends = ",".join(f"{n}:{next(iter(getattr(sparse, n).dispatch_log.values()))}"
                        for n in ("fc1", "fc2"))
    return {"dense_ms": 1e3 * t_dense, "block_ms": 1e3 * t_block, "backends": backends}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: one seed, 90 %% only, 2 rounds, 3 epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
    ap.add_argument("--rewind-epochs", type=int, default=1,
                    help="epochs of warm-up whose weights every round rewinds to (0: init)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sparsities = (0.9,) if args.quick else (0.8, 0.9, 0.95)
    seeds = range(1 if args.quick else args.seeds)
    epochs, rounds = (3, 2) if args.quick else (15, 4)
    data = load_digits_split()
    rows = []
    t0 = time.perf_counter()
    dense_acc = []
    for sp in sparsities:
        for variant in VARIANTS:
            accs, achieved = [], []
            timing = None
            for seed in seeds:
                model, hist = run(variant, sp, seed, data, epochs, rounds,
                                  args.rewind_epochs, args.hidden)
                rec = hist[-1]
                if variant == "IMP":
                    dense_acc.append(hist[0]["score"])     # round 0: the dense model
                accs.append(rec["score"])
                achieved.append(rec["sparsity"])
                if seed == 0:
                    timing = inference(model, rec["plan"], data[2])
            row = {"sparsity": sp, "variant": variant, "acc_mean": float(np.mean(accs)),
                   "acc_std": float(np.std(accs)), "achieved_sparsity": float(np.mean(achieved)),
                   "seeds": len(accs), **timing}
            rows.append(row)
            speed = (f" | {row['dense_ms']:.2f} ms dense vs {row['block_ms']:.2f} ms block "
                     f"({row['backends']})" if row["block_ms"] else "")
            print(f"sparsity {sp:.2f} {variant:22s} acc {100 * row['acc_mean']:.2f} "
                  f"+- {100 * row['acc_std']:.2f} (achieved {row['achieved_sparsity']:.3f})"
                  f"{speed}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    by = {(r["sparsity"], r["variant"]): r for r in rows}
    lines = [f"Dense model (round 0 of every IMP run): {100 * np.mean(dense_acc):.1f} ± "
             f"{100 * np.std(dense_acc):.1f} % test accuracy.", "",
             "| sparsity | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for sp in sparsities:
        cells = [f"{100 * by[sp, v]['acc_mean']:.1f} ± {100 * by[sp, v]['acc_std']:.1f}"
                 for v in VARIANTS]
        lines.append(f"| {sp:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| sparsity | variant | dense ms | block-sparse ms | speed-up | dispatch |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["block_ms"]:
            lines.append(f"| {r['sparsity']:.2f} | {r['variant']} | {r['dense_ms']:.2f} | "
                         f"{r['block_ms']:.2f} | {r['dense_ms'] / r['block_ms']:.2f}x | "
                         f"{r['backends']} |")
    stem = "digits" + ("" if args.hidden == 512 else f"_h{args.hidden}")
    write_outputs(args.out, stem + ("_quick" if args.quick else ""), rows, lines)
    print("\n".join(lines))
    for sp in sparsities:
        imp = by[sp, "IMP"]["acc_mean"]
        for v in ("IMP-Regroup grid", "IMP-Regroup shuffled"):
            print(f"sparsity {sp:.2f}: {v} - IMP = {100 * (by[sp, v]['acc_mean'] - imp):+.1f} "
                  f"points; - naive blocks = "
                  f"{100 * (by[sp, v]['acc_mean'] - by[sp, 'naive blocks']['acc_mean']):+.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
