"""Dynamic sparse training on scikit-learn's digits: RegroupDST against RigL, DSB and
block RigL (issue 13's first target).

An MLP 64 -> 256 -> 256 -> 10 (fc1, fc2, head) is trained on a fixed 70/30 split of the
1797 8x8 digits with 95 % of its Linear weights pruned, spread by ERK (RigL's
Erdos-Renyi-Kernel rule, :func:`regroup.dst.layer_densities`) over the three layers:
fc1 7.5 %, fc2 3.0 %, head 40 % dense. Blocks are 16x16. The head (10 x 256) is smaller
than a block on its row side, so no method blocks it: in every method it is trained by
element-wise RigL at its ERK density (as DSB's code leaves layers it cannot block to
plain RigL). fc1 and fc2 keep ``ceil(density * numel / 256)`` tiles (DSB's budget; 5 and
8 tiles) in the block methods, and RigL keeps exactly as many weights (1280 and 2048), so
every method trains the same number of weights per layer.

Every method has the same optimizer (Adam, cosine learning rate), steps, batches, data
order, initial weights (per seed) and mask schedule: an update every ``T`` steps while
``t < T_end = 0.75 * steps``, drop fraction ``alpha / 2 (1 + cos(pi t / T_end))``. New
weights and their Adam state start at 0. Methods:

- ``RigL``              element-wise: drop the smallest |w|, grow the largest |dense
                        gradient| (:func:`regroup.dst.drop_grow` on single weights)
- ``RegroupDST``        :class:`regroup.adapters.torch.RegroupDST`, shuffled tiles, a warm
                        re-layout every ``--relayout-every`` updates
- ``DSB``               DSB's procedure as issue 13 reads its public code, written here:
                        block-aware element drop (a candidate of the d_t smallest |w| goes
                        only if its tile row or tile column holds >= b/2 candidates),
                        element grow by |dense gradient| (as many as dropped), then the
                        rows re-clustered FROM SCRATCH (regroup's ``dsb`` partitioner:
                        complete linkage on cosine distance of the binary rows, rows/b
                        clusters, largest first), columns ranked per panel by the L2 norm
                        of |w| (grown weights scored at the mean kept |w|), and the top
                        ``K`` tiles by L2 norm kept
- ``RigL+regroup+FT``   RigL until ``T_end``, then each block layer regrouped
                        (:func:`regroup.regroup_pattern`, method auto, shuffled, magnitude
                        objective, ``K`` tiles) and fine-tuned with the masks fixed for the
                        last 25 % of the steps (the other methods' masks are frozen then too)
- ``block RigL``        ``RegroupDST(format="grid", relayout_every=0)``: whole 16x16 blocks
                        of the identity order, dropped and grown, never permuted

Two ablations of RegroupDST run only when named in ``--methods`` (printed, not written):
``RegroupDST grid`` (grid blocks, re-layouts as RegroupDST) and ``RegroupDST no relayout``
(shuffled, ``relayout_every=0``: tiles gathered per panel by gradient, rows never moved).

RegroupDST, DSB and block RigL start from the same random tiles (identity order). Per
method: test accuracy over paired seeds (a seed fixes the weights' initialisation, the
data order and the method's randomness); gap closed ``(acc - block RigL) / (RigL - block
RigL)`` (of the means); a paired test RegroupDST vs DSB (``scipy.stats.ttest_rel``,
two-sided; Wilcoxon signed-rank alongside); the share of the training time spent in mask
updates.

    python benchmarks/dst_bench.py [--quick] [--seeds 10] [--steps 3000] [--out DIR]
    python benchmarks/dst_bench.py --methods "RegroupDST grid,RegroupDST no relayout"
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

import regroup
from regroup.adapters.torch import RegroupDST
from regroup.adapters.torch.dst import RELAYOUT_ROUNDS
from regroup.dst import drop_count, drop_fraction, drop_grow, layer_densities, make_units, \
    units_for_density
from regroup.partitioners.dsb import dsb as dsb_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import write_outputs  # noqa: E402
from digits_example import MLP, load_digits_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("RigL", "RegroupDST", "DSB", "RigL+regroup+FT", "block RigL")
# Ablations of RegroupDST, run on request (--methods): format, and no re-layout.
SPARSIFIER = {"RegroupDST": "shuffled", "block RigL": "grid", "RegroupDST grid": "grid",
              "RegroupDST no relayout": "shuffled"}
EXTRA = ("RegroupDST grid", "RegroupDST no relayout")
LAYERS = ("fc1.weight", "fc2.weight", "head.weight")
BLOCKED = ("fc1.weight", "fc2.weight")     # the head (10 rows) is smaller than a block
HIDDEN = 256
BLOCK = 16
SPARSITY = 0.95


def _module(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn.rsplit(".", 1)[0])


def budgets(model: nn.Module) -> dict[str, dict]:
    """Per layer: its ERK density (95 % over the three layers) and the weights every
    method keeps (block layers: whole tiles, DSB's ceil budget)."""
    shapes = [tuple(_module(model, n).weight.shape) for n in LAYERS]
    dens = layer_densities(shapes, SPARSITY, distribution="erk")
    out = {}
    for n, s, d in zip(LAYERS, shapes, dens):
        if n in BLOCKED:
            tiles = units_for_density(make_units(s, BLOCK, "shuffled"), float(d))
            out[n] = {"density": float(d), "tiles": tiles, "kept": tiles * BLOCK * BLOCK}
        else:
            out[n] = {"density": float(d), "tiles": None,
                      "kept": int(math.ceil(d * math.prod(s) * (1 - 1e-12)))}
    return out


def initial_tiles(model: nn.Module, seed: int, bud: dict) -> dict[str, np.ndarray]:
    """The random kept tiles (identity order) RegroupDST draws at prepare, drawn the
    same way, so that DSB starts where RegroupDST and block RigL start."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in BLOCKED:
        units = make_units(tuple(_module(model, n).weight.shape), BLOCK, "shuffled")
        kept = np.zeros(units.n_units, bool)
        kept[rng.choice(units.n_units, size=bud[n]["tiles"], replace=False)] = True
        out[n] = kept.reshape(units.table_shape)
    return out


def _tile_mask(shape, kept: np.ndarray) -> np.ndarray:
    """Identity-order tiles ``kept`` (n_panels, n_tiles) as an element mask."""
    return np.kron(kept, np.ones((BLOCK, BLOCK), bool))[:shape[0], :shape[1]]


class Masks:
    """Element masks on some Linear weights (a ``FakeSparsity`` parametrization, as
    torch.ao.pruning and RegroupDST use) with the dense gradient ``dL/d(w * mask)``
    collected on the step before each update, and masks swapped RigL-style: every position
    not kept both before and after (and not dropped) restarts at 0, with its Adam state."""

    def __init__(self, model: nn.Module, masks: dict[str, np.ndarray],
                 opt: torch.optim.Optimizer, T: int, T_end: int):
        self.model, self.opt, self.T, self.T_end = model, opt, T, T_end
        self.fake, self.grads, self.armed = {}, {}, False
        self.t = 0
        for n, m in masks.items():
            mod = _module(model, n)
            mask = torch.from_numpy(m.copy())
            with torch.no_grad():
                mod.weight.masked_fill_(~mask, 0)
            fake = FakeSparsity(mask.float())
            parametrize.register_parametrization(mod, "weight", fake)
            fake.register_forward_hook(self._hook(n))
            self.fake[n] = fake
        self._arm()

    def _hook(self, n):
        def on_grad(g):
            self.grads[n] = g.detach().clone() if n not in self.grads else self.grads[n] + g

        def hook(_m, _i, out):
            if self.armed and out.requires_grad:
                out.register_hook(on_grad)
        return hook

    def _arm(self):
        nxt = self.t + 1
        self.armed = nxt % self.T == 0 and nxt < self.T_end
        if not self.armed:
            self.grads.clear()

    def tick(self) -> bool:
        """Count a step; True when this step updates the masks (grads are ready)."""
        self.t += 1
        return self.t % self.T == 0 and self.t < self.T_end

    def original(self, n) -> torch.Tensor:
        return _module(self.model, n).parametrizations.weight.original

    def mask(self, n) -> np.ndarray:
        return self.fake[n].mask.detach().numpy().astype(bool)

    def weight(self, n) -> np.ndarray:
        return (self.original(n).detach() * self.fake[n].mask).double().numpy()

    def set(self, n, new: np.ndarray, carry: np.ndarray) -> None:
        orig = self.original(n)
        keep = torch.from_numpy(carry & new)
        with torch.no_grad():
            self.fake[n].mask.copy_(torch.from_numpy(new).float())
            orig.masked_fill_(~keep, 0)
            for v in self.opt.state.get(orig, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == orig.shape:
                    v.masked_fill_(~keep, 0)


def rigl_update(masks: Masks, n: str, d: float) -> None:
    """Element-wise RigL: drop the d_t smallest |w| of the kept weights, grow as many of
    the others (a just-dropped one included, RigL's code) by largest |dense gradient|; a
    weight dropped and regrown keeps its value."""
    old = masks.mask(n)
    W, G = masks.weight(n), masks.grads[n].double().numpy()
    dg = drop_grow(np.abs(W), np.abs(G), old, drop_count(int(old.sum()), d))
    masks.set(n, dg.kept, old)


def dsb_recluster(elem: np.ndarray, S: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """DSB's re-layout from scratch: rows clustered on the binary element mask ``elem``
    (regroup's ``dsb`` partitioner: complete linkage on cosine distance, panels of
    ``BLOCK`` rows), columns ranked per panel by the L2 norm of the scores ``S``, the top
    ``K`` tiles kept. Returns (tile id per position, -1 off the tiles; the row order)."""
    n, m = elem.shape
    b = BLOCK
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        perm = dsb_rows(elem.astype(np.float64), b)
    S2 = S ** 2
    tiles = []          # (score, p, rows, columns)
    for p in range(-(-n // b)):
        rws = perm[p * b:(p + 1) * b]
        colnorm = S2[rws].sum(0)
        order = np.lexsort((np.arange(m), -colnorm))       # by L2 norm, ties by index
        for j in range(0, m, b):
            c = order[j:j + b]
            tiles.append((float(colnorm[c].sum()), p * 10_000 + j, rws, c))
    tiles.sort(key=lambda x: (-x[0], x[1]))
    tile_id = np.full((n, m), -1, np.int64)
    for t, (_, _, rws, c) in enumerate(tiles[:K]):
        tile_id[np.ix_(rws, c)] = t
    return tile_id, perm


class DSBLayer:
    """DSB's procedure on one Linear weight: the current tiles (row order, per-panel
    kept columns) and the update described in the module docstring."""

    def __init__(self, shape, kept_tiles: np.ndarray, K: int):
        self.shape, self.K = tuple(shape), K
        n, m = self.shape
        self.row_perm = np.arange(n)
        self.tile_id = np.full(self.shape, -1, np.int64)    # per kept element: its tile
        P, J = kept_tiles.shape
        for t, (p, j) in enumerate(zip(*np.nonzero(kept_tiles))):
            self.tile_id[p * BLOCK:(p + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = t

    def update(self, W: np.ndarray, G: np.ndarray, d: float
               ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Returns the new mask, the positions that keep their weights, and stats."""
        n, m = self.shape
        b = BLOCK
        old = self.tile_id >= 0
        absW = np.abs(W)
        # -- block-aware drop: candidates are the d_t smallest |w| of the kept weights
        on = np.flatnonzero(old.ravel())
        n_cand = drop_count(on.size, d)
        cand = on[np.lexsort((on, absW.ravel()[on]))[:n_cand]]
        rows, cols = np.divmod(cand, m)
        tid = self.tile_id.ravel()[cand]
        key_r = tid * n + rows                    # (tile, row): the candidate's tile row
        key_c = tid * m + cols                    # (tile, column): its tile column
        _, inv_r, cnt_r = np.unique(key_r, return_inverse=True, return_counts=True)
        _, inv_c, cnt_c = np.unique(key_c, return_inverse=True, return_counts=True)
        go = (cnt_r[inv_r] >= b / 2) | (cnt_c[inv_c] >= b / 2)
        dropped = cand[go]
        after = old.ravel().copy()
        after[dropped] = False
        # -- grow as many by largest |dense gradient| (a just-dropped one may come back)
        pool = np.flatnonzero(~after)
        grown = pool[np.lexsort((pool, -np.abs(G).ravel()[pool]))[:dropped.size]]
        carried = after.reshape(self.shape)            # weights that keep their value
        elem = after.copy()
        elem[grown] = True
        elem = elem.reshape(self.shape)
        # -- score: |w|, grown weights (at 0) at the mean kept |w|
        S = np.where(carried, absW, 0.0)
        grown_m = elem & ~carried
        S[grown_m] = absW[carried].mean() if carried.any() else 1.0
        tile_id, perm = dsb_recluster(elem, S, self.K)
        self.tile_id, self.row_perm = tile_id, perm
        new = tile_id >= 0
        stats = {"cand": int(n_cand), "dropped": int(dropped.size),
                 "elem_kept_in_tiles": float((elem & new).sum() / max(elem.sum(), 1)),
                 "churn": float((W ** 2)[old & ~(carried & new)].sum()
                                / max((W ** 2)[old].sum(), 1e-300))}
        return new, carried, stats


def _batches(n: int, batch: int, seed: int):
    """Index batches of ``batch`` training examples, reshuffled every epoch (seeded)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch], order[batch:]
        yield idx


def _sgd_step(model, opt, sched, X, y, idx) -> None:
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    opt.step()
    sched.step()


def run(method: str, seed: int, data, cfg: dict) -> dict:
    """Train one method on one seed; its test accuracy and timings."""
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = MLP(HIDDEN)
    bud = budgets(model)
    steps, T = cfg["steps"], cfg["T"]
    T_end = int(round(0.75 * steps))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    shapes = {n: tuple(_module(model, n).weight.shape) for n in LAYERS}
    tiles0 = initial_tiles(model, seed, bud)
    info: dict = {}

    # The head: element-wise RigL in every method (random initial mask, seeded).
    def random_mask(n):
        flat = np.zeros(math.prod(shapes[n]), bool)
        flat[np.random.default_rng([seed, LAYERS.index(n)]).choice(
            flat.size, bud[n]["kept"], replace=False)] = True
        return flat.reshape(shapes[n])

    elementwise = ["head.weight"] if method in SPARSIFIER or method == "DSB" \
        else list(LAYERS)
    masks = Masks(model, {n: random_mask(n) if n not in BLOCKED or method in (
        "RigL", "RigL+regroup+FT") else _tile_mask(shapes[n], tiles0[n]) for n in LAYERS
        if n in elementwise or method == "DSB"}, opt, T, T_end)
    sparsifier = None
    if method in SPARSIFIER:
        # ERK over the three layers, RegroupDST selecting two of them: the sparsity of fc1
        # and fc2 alone that gives them the same ERK densities.
        kept12 = sum(bud[n]["density"] * math.prod(shapes[n]) for n in BLOCKED)
        sp12 = 1 - kept12 / sum(math.prod(shapes[n]) for n in BLOCKED)
        fmt = SPARSIFIER[method]
        every = 0 if method in ("block RigL", "RegroupDST no relayout") \
            else cfg["relayout_every"]
        sparsifier = RegroupDST(sp12, distribution="erk", block=BLOCK, format=fmt, T=T,
                                T_end=T_end, alpha=cfg["alpha"], relayout_every=every,
                                warm_rounds=cfg.get("warm_rounds"), optimizer=opt, seed=seed)
        sparsifier.prepare(model, [{"tensor_fqn": n} for n in BLOCKED])
        for n in BLOCKED:
            assert abs(sparsifier.densities[n] - bud[n]["density"]) < 1e-9
            assert (sparsifier.results[n].mask == _tile_mask(shapes[n], tiles0[n])).all()
    dsb = {n: DSBLayer(shapes[n], tiles0[n], bud[n]["tiles"]) for n in BLOCKED} \
        if method == "DSB" else {}
    dsb_stats = []

    batches = _batches(len(Xtr), cfg["batch"], seed)
    t_train = t_mask = 0.0
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        _sgd_step(model, opt, sched, Xtr, ytr, next(batches))
        t1 = time.perf_counter()
        if masks.tick():
            d = drop_fraction(masks.t, T_end, cfg["alpha"])
            with torch.no_grad():
                for n in masks.fake:
                    if n in dsb:
                        W = masks.weight(n)
                        new, carried, st = dsb[n].update(
                            W, masks.grads[n].double().numpy(), d)
                        masks.set(n, new, carried)
                        dsb_stats.append(st)
                    else:
                        rigl_update(masks, n, d)
        masks._arm()
        if sparsifier is not None:
            sparsifier.step()
        if method == "RigL+regroup+FT" and step == T_end:
            # Regroup RigL's masks into the same number of shuffled 16x16 tiles; fine-tune.
            for n in BLOCKED:
                W = masks.weight(n)
                res = regroup.regroup_pattern(
                    regroup.from_array(W, name=n), options=regroup.RegroupOptions(
                        block=BLOCK, format="shuffled", method="auto",
                        budget=f"blocks={bud[n]['tiles']}", objective="magnitude",
                        seed=seed))
                new = res.mask.reshape(shapes[n]).astype(bool)
                info.setdefault("kept_abs_w", []).append(
                    float(np.abs(W)[new].sum() / np.abs(W).sum()))
                masks.set(n, new, masks.mask(n))
        t2 = time.perf_counter()
        t_train += t2 - t0
        t_mask += t2 - t1
    model.eval()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    kept = {}
    for n in LAYERS:
        mod = _module(model, n)
        kept[n] = int((mod.weight != 0).sum()) if not parametrize.is_parametrized(mod) else \
            int(sum(p.mask.sum() for p in mod.parametrizations.weight
                    if hasattr(p, "mask")))
    out = {"method": method, "seed": seed, "acc": acc, "train_s": t_train,
           "mask_s": t_mask, "kept_fc1": kept["fc1.weight"], "kept_fc2": kept["fc2.weight"],
           "kept_head": kept["head.weight"]}
    if sparsifier is not None:
        h = sparsifier.history
        assert all(r["churn"] <= r["drop_fraction"] * (1 + 1e-9) for r in h)
        tried = [r for r in h if r["relayout"] is not None]
        out["relayouts"] = f"{sum(bool(r['relayout']) for r in tried)}/{len(tried)}"
        out["max_churn_over_d"] = max((r["churn"] / r["drop_fraction"] for r in h
                                       if r["drop_fraction"] > 0), default=0.0)
    if dsb_stats:
        out["dsb_churn"] = float(np.mean([s["churn"] for s in dsb_stats]))
        out["dsb_elems_in_tiles"] = float(np.mean([s["elem_kept_in_tiles"]
                                                   for s in dsb_stats]))
    if "kept_abs_w" in info:
        out["regroup_kept_abs_w"] = float(np.mean(info["kept_abs_w"]))
    return out


def _notes(runs: list[dict]) -> str:
    """What the runs of one method say about their mask updates."""
    r0 = runs[0]
    if "relayouts" in r0:
        acc, tried = (sum(int(r["relayouts"].split("/")[i]) for r in runs) for i in (0, 1))
        worst = max(r["max_churn_over_d"] for r in runs)
        return (f"re-layouts accepted {acc}/{tried}; churn <= {worst:.2f} d_t at every "
                "update" if tried else f"no re-layout; churn <= {worst:.2f} d_t")
    if "dsb_churn" in r0:
        return (f"mean churn per update {np.mean([r['dsb_churn'] for r in runs]):.3f} "
                "of the kept w^2 (no bound); weights kept by the element drop/grow that land "
                f"in the chosen tiles {np.mean([r['dsb_elems_in_tiles'] for r in runs]):.2f}")
    if "regroup_kept_abs_w" in r0:
        return ("regrouped tiles keep "
                f"{np.mean([r['regroup_kept_abs_w'] for r in runs]):.3f} of RigL's |w| "
                "(fc1, fc2)")
    return ""


def summarize(runs: list[dict], seeds: list[int]) -> tuple[list[dict], list[str], dict]:
    from scipy import stats
    acc = {m: np.array([next(r["acc"] for r in runs if r["method"] == m and r["seed"] == s)
                        for s in seeds]) for m in METHODS}
    share = {m: sum(r["mask_s"] for r in runs if r["method"] == m)
             / sum(r["train_s"] for r in runs if r["method"] == m) for m in METHODS}
    secs = {m: float(np.mean([r["train_s"] for r in runs if r["method"] == m]))
            for m in METHODS}
    rigl, block = acc["RigL"].mean(), acc["block RigL"].mean()
    gap = {m: (acc[m].mean() - block) / (rigl - block) if rigl != block else float("nan")
           for m in METHODS}
    diff = acc["RegroupDST"] - acc["DSB"]
    test = {"n": len(seeds), "mean_diff": float(diff.mean()),
            "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
            "losses": int((diff < 0).sum())}
    if len(seeds) >= 2 and np.any(diff != 0):
        test["t"], test["p_ttest"] = map(float, stats.ttest_rel(acc["RegroupDST"],
                                                                acc["DSB"]))
        test["p_wilcoxon"] = float(stats.wilcoxon(acc["RegroupDST"], acc["DSB"]).pvalue)
    else:
        test["t"] = test["p_ttest"] = test["p_wilcoxon"] = float("nan")
    rows = []
    for m in METHODS:
        extra = [r for r in runs if r["method"] == m]
        rows.append({"method": m, "seeds": len(seeds), "acc_mean": float(acc[m].mean()),
                     "acc_sd": float(acc[m].std(ddof=1)) if len(seeds) > 1 else 0.0,
                     "acc_min": float(acc[m].min()),
                     "gap_closed": float(gap[m]), "mask_update_share": float(share[m]),
                     "train_s_per_run": secs[m],
                     "kept_fc1": extra[0]["kept_fc1"], "kept_fc2": extra[0]["kept_fc2"],
                     "kept_head": extra[0]["kept_head"],
                     "accs": " ".join(f"{a:.4f}" for a in acc[m]),
                     "notes": _notes(extra)})
    lines = ["| method | test acc mean | sd | min | gap closed | mask updates / training "
             "time | s per run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gc = "" if r["method"] in ("RigL", "block RigL") else f"{r['gap_closed']:.2f}"
        lines.append(f"| {r['method']} | {100 * r['acc_mean']:.2f} | {100 * r['acc_sd']:.2f} "
                     f"| {100 * r['acc_min']:.2f} | {gc} | {100 * r['mask_update_share']:.1f} % "
                     f"| {r['train_s_per_run']:.1f} |")
    lines += [""] + [f"- {r['method']}: {r['notes']}" for r in rows if r["notes"]]
    lines += ["", f"RegroupDST - DSB over {test['n']} paired seeds: mean "
              f"{100 * test['mean_diff']:+.2f} points ({test['wins']} wins, {test['ties']} "
              f"ties, {test['losses']} losses); paired t-test (scipy.stats.ttest_rel, "
              f"two-sided) t = {test['t']:.2f}, p = {test['p_ttest']:.3g}; Wilcoxon "
              f"signed-rank p = {test['p_wilcoxon']:.3g}."]
    return rows, lines, test


def paired_tests(runs: list[dict], seeds: list[int]) -> list[str]:
    """Paired differences between the methods a (partial) run holds, over its seeds:
    RegroupDST and RigL against DSB, RegroupDST against RigL."""
    from scipy import stats
    acc = {}
    for r in runs:
        acc.setdefault(r["method"], {})[r["seed"]] = r["acc"]
    out = []
    for a, b in (("RegroupDST", "DSB"), ("RigL", "DSB"), ("RegroupDST", "RigL")):
        if a not in acc or b not in acc or len(seeds) < 2:
            continue
        x = np.array([acc[a][s] for s in seeds])
        y = np.array([acc[b][s] for s in seeds])
        d = x - y
        if not d.any():
            out.append(f"{a} - {b} over {len(seeds)} paired seeds: identical")
            continue
        p_t = float(stats.ttest_rel(x, y).pvalue)
        p_w = float(stats.wilcoxon(x, y).pvalue)
        out.append(f"{a} - {b} over {len(seeds)} paired seeds: mean {100 * d.mean():+.2f} "
                   f"points ({int((d > 0).sum())} wins, {int((d == 0).sum())} ties, "
                   f"{int((d < 0).sum())} losses), paired t-test p = {p_t:.3g}, Wilcoxon "
                   f"p = {p_w:.3g}")
    return out


COST_LAYERS = ("encoder.layer.0.intermediate.dense.weight",      # 1536 x 384
               "encoder.layer.0.output.dense.weight")            # 384 x 1536


def cost_main(args) -> int:
    """Issue 13's cost target: one re-layout on MiniLM's real 1536x384 and 384x1536
    weights, RegroupDST's warm start against DSB's re-clustering from scratch, on the
    same scores and tile budget.

    The state before the update: each weight magnitude-pruned to ``--density`` and laid
    out by auto (shuffled, 16x16, ``K = units_for_density`` tiles, as a layout in the
    middle of training). The update's scores ``V``: ``w**2`` where the layout keeps
    weights, ``(s * G)**2`` elsewhere (RegroupDST's scores), with ``G`` a real gradient
    (the masked model distilled towards the dense one, MSE of the last hidden states on
    English sentences) and ``s`` making the mean ``s * |G|`` over the best candidate tile
    equal the mean kept ``|w|`` (as RegroupDST and DSB score grown weights). Both pick
    ``K`` tiles on ``V``: RegroupDST by its re-layout, :func:`regroup.dst.relayout`
    (timed also as the same search through ``regroup_pattern(init=layout,
    warm_rounds=...)``, which builds a pattern and its metrics), DSB by
    :func:`dsb_recluster` on the top ``K * 256`` entries of ``V`` (the elements an
    element-wise update keeps).
    Reported: milliseconds (best of ``--repeat``), the share of ``V`` each keeps. Both
    run on one thread, BLAS's included (threadpoolctl): a product on a BLAS pool shared
    with a busy core took 2.4x longer (67.5 ms against 28 ms)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        return _cost(args)


def _cost(args) -> int:
    """:func:`cost_main`'s body, on one thread."""
    import zoo
    from regroup.blocks import layout_mask
    from regroup.dst import layout_units, relayout, unit_scores, units_for_density
    model, tokenizer = zoo.minilm(1)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    layouts = {}
    for name in COST_LAYERS:
        W = dense[name].double().numpy()
        keep = np.abs(W) >= np.quantile(np.abs(W), 1 - args.density)
        units = make_units(W.shape, (BLOCK, BLOCK), "shuffled")
        K = units_for_density(units, args.density)
        layouts[name] = (K, regroup.regroup_pattern(
            regroup.from_array(W * keep, name=name), block=BLOCK, format="shuffled",
            budget=f"blocks={K}", seed=0))
        with torch.no_grad():
            dict(model.named_parameters())[name].mul_(
                torch.from_numpy(layouts[name][1].mask2d).to(torch.float32))
    enc = tokenizer(zoo.english_sentences(32), padding=True, truncation=True,
                    max_length=64, return_tensors="pt")
    with torch.no_grad():
        target = _dense_hidden(dense, model, enc)
    model.zero_grad()
    F.mse_loss(model(**enc).last_hidden_state, target).backward()
    # RegroupDST's rounds unless --warm-rounds says otherwise
    rounds = args.warm_rounds or RELAYOUT_ROUNDS
    rows = []
    for name in COST_LAYERS:
        K, cur = layouts[name]
        W = dense[name].double().numpy()
        G = dict(model.named_parameters())[name].grad.double().numpy()
        carried = cur.mask2d
        units, kept = layout_units(cur, rank=G)
        cand = unit_scores(np.abs(G), units, power=1).reshape(-1)[~kept.reshape(-1)]
        scale = np.abs(W[carried]).mean() / (cand.max() / BLOCK ** 2)
        # |w| and scaled |G|: DSB ranks its columns by their L2 norm; RegroupDST's
        # re-layout keeps the most of their squares, V (what "kept" measures for both)
        S = np.where(carried, np.abs(W), scale * np.abs(G))
        V = np.square(S)
        row = {"layer": name, "shape": "x".join(map(str, W.shape)), "tiles": K,
               "warm rounds": rounds,
               "kept before": round(float(V[carried].sum() / V.sum()), 4)}
        for label in ("regroup warm", "regroup_pattern", "DSB from scratch"):
            best = math.inf
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                if label == "regroup warm":          # what RegroupDST's re-layout runs
                    mask = layout_mask(relayout(V, cur, K, rounds=rounds))
                elif label == "regroup_pattern":     # the same search, with its metrics
                    mask = regroup.regroup_pattern(
                        regroup.from_array(V, name=name), block=BLOCK, format="shuffled",
                        budget=f"blocks={K}", method="identity", refine=True, seed=0,
                        init=cur, warm_rounds=rounds).mask2d
                else:
                    flat = V.ravel()
                    top = np.argpartition(-flat, K * BLOCK ** 2)[:K * BLOCK ** 2]
                    elem = np.zeros(V.size, bool)
                    elem[top] = True
                    mask = dsb_recluster(elem.reshape(V.shape), S, K)[0] >= 0
                best = min(best, time.perf_counter() - t0)
            row[f"{label} ms"] = round(1e3 * best, 1)
            row[f"{label} kept"] = round(float(V[mask].sum() / V.sum()), 4)
        row["DSB / regroup time"] = round(row["DSB from scratch ms"] / row["regroup warm ms"],
                                          1)
        rows.append(row)
        print(row, flush=True)
    lines = ["| layer | shape | tiles | warm rounds | kept before | regroup warm ms | kept | "
             "regroup_pattern(init=) ms | DSB from scratch ms | kept | DSB / regroup time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['shape']} | {r['tiles']} | {r['warm rounds']} | "
              f"{r['kept before']} | {r['regroup warm ms']} | {r['regroup warm kept']} | "
              f"{r['regroup_pattern ms']} | {r['DSB from scratch ms']} | "
              f"{r['DSB from scratch kept']} | {r['DSB / regroup time']} |" for r in rows]
    write_outputs(args.out, "dst_cost", rows, lines)
    print("\n".join(lines))
    return 0


def _dense_hidden(dense: dict, model: nn.Module, enc) -> torch.Tensor:
    """The dense model's last hidden states (``model`` borrows the dense weights)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in COST_LAYERS}
    with torch.no_grad():
        for n in COST_LAYERS:
            params[n].copy_(dense[n])
        out = model(**enc).last_hidden_state
        for n in COST_LAYERS:
            params[n].copy_(saved[n])
    return out


MOBILENET_METHODS = ("RigL", "RegroupDST", "block RigL")


def digits_32(seed: int = 0):
    """The digits split upscaled to 3 x 32 x 32 (bilinear), normalised with ImageNet's
    statistics: inputs MobileNetV2's pretrained filters can read."""
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def up(X: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(X.view(-1, 1, 8, 8), size=32, mode="bilinear", align_corners=False)
        return ((x.clamp(0, 1).expand(-1, 3, -1, -1) - mean) / std).contiguous()
    return up(Xtr), ytr, up(Xte), yte


def mobilenet_run(method: str, seed: int, data, cfg: dict) -> dict:
    """Fine-tune MobileNetV2 (ImageNet weights, a new 10-way head) on digits at 32 x 32 with
    its 1x1 convolutions sparse (ERK over them); every method through RegroupDST, started
    from the pretrained weights' own layout (``init="magnitude"``)."""
    import zoo
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = zoo.mobilenet_v2()
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, 10)
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    steps, T = cfg["steps"], cfg["T"]
    T_end = int(round(0.75 * steps))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    block, fmt, every = {"RigL": (1, "grid", 0), "block RigL": (BLOCK, "grid", 0),
                         "RegroupDST": (BLOCK, "shuffled", cfg["relayout_every"])}[method]
    sparsifier = RegroupDST(cfg["sparsity"], distribution="erk", block=block, format=fmt,
                            T=T, T_end=T_end, alpha=cfg["alpha"], relayout_every=every,
                            optimizer=opt, init="magnitude", seed=seed)
    sparsifier.prepare(model, [{"tensor_fqn": n} for n in names])
    batches = _batches(len(Xtr), cfg["batch"], seed)
    t_train = t_mask = 0.0
    model.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        _sgd_step(model, opt, sched, Xtr, ytr, next(batches))
        t1 = time.perf_counter()
        sparsifier.step()
        t2 = time.perf_counter()
        t_train += t2 - t0
        t_mask += t2 - t1
    model.eval()
    with torch.no_grad():
        acc = float(torch.cat([model(Xte[i:i + 256]).argmax(1)
                               for i in range(0, len(Xte), 256)]).eq(yte).float().mean())
    h = sparsifier.history
    assert all(r["churn"] <= r["drop_fraction"] * (1 + 1e-9) for r in h)
    tried = [r for r in h if r["relayout"] is not None]
    kept = sum(int(sparsifier.results[n].mask.sum()) for n in names)
    total = sum(int(np.prod(sparsifier.results[n].mask.shape)) for n in names)
    return {"method": method, "seed": seed, "acc": acc, "train_s": t_train, "mask_s": t_mask,
            "density": kept / total, "element_wise": len(sparsifier.element_wise),
            "relayouts": f"{sum(bool(r['relayout']) for r in tried)}/{len(tried)}"}


def mobilenet_main(args) -> int:
    """Issue 13's MobileNetV2 target: RegroupDST within 1 point of RigL."""
    cfg = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "T": args.T,
           "alpha": args.alpha, "relayout_every": args.relayout_every,
           "sparsity": args.sparsity}
    seeds = list(range(args.seeds))
    # --methods picks some of the three (the default names all of them)
    methods = [m for m in MOBILENET_METHODS if m in args.methods.split(",")]
    if not methods:
        raise SystemExit(f"--mobilenet runs {', '.join(MOBILENET_METHODS)}; --methods names "
                         "none of them")
    data = digits_32()
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        for m in methods:
            r = mobilenet_run(m, seed, data, cfg)
            runs.append(r)
            print(f"seed {seed} {m:12s} acc {100 * r['acc']:.2f}  train {r['train_s']:.1f} s "
                  f"(mask updates {r['mask_s']:.2f} s, re-layouts {r['relayouts']})  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    wall = time.perf_counter() - t0
    if methods != list(MOBILENET_METHODS):
        return 0            # a partial run: the per-run lines above, nothing written
    acc = {m: np.array([r["acc"] for r in runs if r["method"] == m])
           for m in MOBILENET_METHODS}
    rows = []
    lines = ["| method | test acc mean | sd | min | vs RigL (paired mean) | mask updates / "
             "training time | density | s per run |", "|---|---|---|---|---|---|---|---|"]
    for m in MOBILENET_METHODS:
        mine = [r for r in runs if r["method"] == m]
        share = sum(r["mask_s"] for r in mine) / sum(r["train_s"] for r in mine)
        d = acc[m] - acc["RigL"]
        row = {"method": m, "seeds": len(seeds), "acc_mean": float(acc[m].mean()),
               "acc_sd": float(acc[m].std(ddof=1)) if len(seeds) > 1 else 0.0,
               "acc_min": float(acc[m].min()), "vs_rigl": float(d.mean()),
               "mask_update_share": share, "density": mine[0]["density"],
               "train_s_per_run": float(np.mean([r["train_s"] for r in mine])),
               "accs": " ".join(f"{a:.4f}" for a in acc[m]),
               "relayouts": " ".join(r["relayouts"] for r in mine)}
        rows.append(row)
        lines.append(f"| {m} | {100 * row['acc_mean']:.2f} | {100 * row['acc_sd']:.2f} | "
                     f"{100 * row['acc_min']:.2f} | {100 * row['vs_rigl']:+.2f} | "
                     f"{100 * share:.1f} % | {row['density']:.4f} | "
                     f"{row['train_s_per_run']:.1f} |")
    header = [f"digits upscaled to 3x32x32, MobileNetV2 (ImageNet weights, new 10-way head), "
              f"its 1x1 convs {100 * cfg['sparsity']:.0f} % sparse (ERK), b={BLOCK}, "
              f"every method started from the pretrained weights' layout (init='magnitude'); "
              f"{cfg['steps']} steps of batch {cfg['batch']}, Adam lr {cfg['lr']:g} cosine, "
              f"T={cfg['T']}, T_end={round(0.75 * cfg['steps'])}, alpha={cfg['alpha']:g}, "
              f"RegroupDST relayout_every={cfg['relayout_every']}; {len(seeds)} paired seeds; "
              f"{wall:.0f} s wall.", ""]
    write_outputs(args.out, "dst_mobilenet", rows, header + lines)
    print("\n".join(header + lines))
    return 0


FFN = (384, 1536)      # MiniLM's feed-forward block: 384 -> 1536 -> 384


def _step(model, opt, sp, x, y) -> None:
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    sp.step()


def _share(row: dict, key: str, T: int = 100) -> str:
    """The share of the training time a mask update every ``T`` steps takes: the update
    and what the armed step before it costs over a plain one (its dense gradient
    product; both timed as single steps, a negative difference, which is noise, counted
    as 0), over ``T`` steps (one of them armed) plus the update."""
    extra = row[key] + max(row["armed_step_ms"] - row["single_step_ms"], 0.0)
    return f"{100 * extra / (T * row['step_ms'] + extra):.1f} %"


def speed_main(args) -> int:
    """Training-step time of RegroupDST with masked against block execution on MiniLM's
    feed-forward shapes (an MLP 384 -> 1536 -> 384, GELU, random data): the same
    sparsifier settings, side by side in one process, best of ``--repeat`` timings of
    ``--steps`` steps each (no mask update inside a timing); and the time of a mask
    update per execution (drop and grow of both layers; then with a warm re-layout of
    both too), best of ``--repeat``; and the armed step before an update (it forms the
    dense gradients for grow) against the plain step before it, as single steps."""
    from regroup.adapters.torch import set_backend
    torch.set_num_threads(args.threads)
    d, h = FFN
    rows = []
    for sparsity in args.speed_sparsities:
        for fmt in ("grid", "shuffled"):
            for execution in ("masked", "block"):
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                never = 10 ** 9
                sp = RegroupDST(sparsity, distribution="uniform", block=BLOCK, format=fmt,
                                T=never, T_end=never + 1, optimizer=opt, execution=execution)
                sp.prepare(model)
                if execution == "block":
                    set_backend(model, "bsr")
                x, y = torch.randn(args.batch, d), torch.randn(args.batch, d)
                for _ in range(3):
                    _step(model, opt, sp, x, y)          # warm-up
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        _step(model, opt, sp, x, y)
                    best = min(best, (time.perf_counter() - t0) / args.steps)
                row = {"sparsity": sparsity, "format": fmt, "execution": execution,
                       "step_ms": round(1e3 * best, 2)}
                armed = plain = float("inf")
                for every, key in ((0, "update_ms"), (1, "relayout_update_ms")):
                    # Mask updates (drop and grow; then a warm re-layout too), best of
                    # --repeat: each two steps from the last, as the step before arms
                    # the gradient hooks. That armed step and the plain one before it
                    # are timed alike (single steps, best of all repeats).
                    sp.relayout_every = every
                    fastest = float("inf")
                    for _ in range(args.repeat):
                        # (T_end far ahead: a drop fraction near alpha, not ~0)
                        sp.T, sp.T_end = sp._t + 2, 10 * (sp._t + 2)
                        t0 = time.perf_counter()
                        _step(model, opt, sp, x, y)
                        plain = min(plain, time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        opt.zero_grad()
                        F.mse_loss(model(x), y).backward()
                        opt.step()
                        armed = min(armed, time.perf_counter() - t0)
                        done = len(sp.history)
                        t0 = time.perf_counter()
                        sp.step()
                        fastest = min(fastest, time.perf_counter() - t0)
                        new = sp.history[done:]
                        assert len(new) == 2 and new[-1]["dropped"] > 0
                        assert all((r["relayout"] is None) == (every == 0) for r in new)
                    row[key] = round(1e3 * fastest, 1)
                row["armed_step_ms"] = round(1e3 * armed, 2)
                row["single_step_ms"] = round(1e3 * plain, 2)
                rows.append(row)
                print(rows[-1], flush=True)
    lines = [f"RegroupDST training step, MLP {d}-{h}-{d} (MiniLM's feed-forward shapes), "
             f"b={BLOCK}, uniform density, batch {args.batch}, Adam, {args.threads} "
             f"thread(s); best of {args.repeat} x {args.steps} steps; block execution on the "
             "BSR path; one mask update = drop and grow of both layers (best of "
             f"{args.repeat}), and with a warm re-layout of both (relayout_every=1); the "
             "step before an update is armed (it also forms the dense gradients) and is "
             "timed against the plain step before it, both as single steps (best of "
             f"{2 * args.repeat}); the shares at T=100 count the update and the armed "
             "step's extra time (0 when negative: noise).", "",
             "| sparsity | format | masked ms / step | block ms / step | block / masked | "
             "plain / armed single step ms, masked | block | masked update ms | "
             "block update ms | "
             "masked update + re-layout ms | block update + re-layout ms | "
             "update share at T=100, masked / block | "
             "with a re-layout every update, masked / block |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sparsity in args.speed_sparsities:
        for fmt in ("grid", "shuffled"):
            m, b = (next(r for r in rows if r["sparsity"] == sparsity and r["format"] == fmt
                         and r["execution"] == e) for e in ("masked", "block"))
            lines.append(f"| {sparsity:g} | {fmt} | {m['step_ms']} | {b['step_ms']} | "
                         f"{b['step_ms'] / m['step_ms']:.2f} | {m['single_step_ms']} / "
                         f"{m['armed_step_ms']} | {b['single_step_ms']} / "
                         f"{b['armed_step_ms']} | {m['update_ms']} | "
                         f"{b['update_ms']} | {m['relayout_update_ms']} | "
                         f"{b['relayout_update_ms']} | {_share(m, 'update_ms')} / "
                         f"{_share(b, 'update_ms')} | {_share(m, 'relayout_update_ms')} / "
                         f"{_share(b, 'relayout_update_ms')} |")
    write_outputs(args.out, "dst_speed", rows, lines)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 2 seeds, 300 steps (T 50)")
    ap.add_argument("--seeds", type=int, default=10, help="paired seeds 0..N-1")
    ap.add_argument("--seed-start", type=int, default=0,
                    help="first seed (fresh seeds for a confirmation run): seeds "
                         "START..START+N-1")
    ap.add_argument("--steps", type=int, default=3000, help="training steps (all methods)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam, cosine-annealed to 0")
    ap.add_argument("--T", type=int, default=100, help="steps between mask updates")
    ap.add_argument("--alpha", type=float, default=0.3, help="initial drop fraction")
    ap.add_argument("--relayout-every", type=int, default=1,
                    help="RegroupDST: warm re-layout every that many updates")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset (the summary needs all five; with "
                         "--mobilenet, all three of its methods)")
    ap.add_argument("--cost", action="store_true",
                    help="the re-layout cost target on MiniLM's weights instead of training")
    ap.add_argument("--density", type=float, default=0.1, help="--cost: layer density")
    ap.add_argument("--warm-rounds", type=int, default=None,
                    help="refinement rounds of a re-layout (RegroupDST and --cost; default: "
                         "RegroupDST's)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="--cost, --speed: timings (best kept)")
    ap.add_argument("--mobilenet", action="store_true",
                    help="MobileNetV2 (ImageNet weights) on digits at 32x32 instead of the MLP "
                         "(RigL, RegroupDST, block RigL; set --steps, --T, --lr, --seeds)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="--mobilenet: of the 1x1 convs")
    ap.add_argument("--speed", action="store_true",
                    help="training-step time, masked vs block execution, MiniLM's FFN shapes "
                         "(set --steps, --batch, --repeat, --threads)")
    ap.add_argument("--speed-sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--threads", type=int, default=1, help="--speed: torch threads")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.warm_rounds is not None and args.warm_rounds < 1:
        ap.error(f"--warm-rounds must be >= 1, got {args.warm_rounds}")
    if args.cost:
        return cost_main(args)
    if args.mobilenet:
        return mobilenet_main(args)
    if args.speed:
        return speed_main(args)
    torch.set_num_threads(1)
    cfg = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "T": args.T,
           "alpha": args.alpha, "relayout_every": args.relayout_every,
           "warm_rounds": args.warm_rounds}
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    if args.quick:
        cfg.update(steps=300, T=50)
        seeds = seeds[:2]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS + EXTRA)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from "
                 f"{', '.join(METHODS + EXTRA)}")
    data = load_digits_split()
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        for m in methods:
            r = run(m, seed, data, cfg)
            runs.append(r)
            print(f"seed {seed} {m:16s} acc {100 * r['acc']:.2f}  train {r['train_s']:.1f} s "
                  f"(mask updates {r['mask_s']:.2f} s)  [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
    wall = time.perf_counter() - t0
    stem = "dst_bench" + ("_quick" if args.quick else "")
    if set(methods) != set(METHODS):
        # A partial run (e.g. the ablations): the per-run lines above, nothing written.
        for r in runs:
            if "relayouts" in r:
                print(f"seed {r['seed']} {r['method']}: re-layouts accepted {r['relayouts']}, "
                      f"churn <= {r['max_churn_over_d']:.2f} d_t")
        for line in paired_tests(runs, seeds):
            print(line)
        return 0
    rows, lines, test = summarize(runs, seeds)
    header = [f"digits, MLP 64-{HIDDEN}-{HIDDEN}-10, {100 * SPARSITY:.0f} % sparse (ERK over "
              f"fc1, fc2, head), b={BLOCK}; {cfg['steps']} steps of batch {cfg['batch']}, "
              f"Adam lr {cfg['lr']:g} cosine, T={cfg['T']}, T_end={round(0.75 * cfg['steps'])}, "
              f"alpha={cfg['alpha']:g}, RegroupDST relayout_every={cfg['relayout_every']}; "
              f"{len(seeds)} paired seeds; {wall:.0f} s wall.", ""]
    write_outputs(args.out, stem, rows, header + lines)
    print("\n".join(header + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
