"""Regroup a live PyTorch model: plan every layer, refill its block mask, fold permutations.

:func:`regroup_model` reads each Linear / Conv2d's mask from the model (a
torch.nn.utils.prune reparametrization, a torch.ao.pruning parametrization, or the zeros of
the weight), regroups it with the core engine and applies the refilled block masks in
place. Row and column orders are then made free where possible:

- ``mode="fold"``: every hidden dimension that can be permuted exactly (see
  :mod:`.graph`) gets one order, chosen on the joint pattern of its producers' rows and
  its consumers' columns, and the model's parameters are permuted in place (producer rows
  and bias, norm parameters and running stats, consumer columns). Nothing runs at
  inference for those sides. The other sides keep a runtime permutation.
- ``mode="runtime"``: parameters stay in place; every layer keeps its own orders, applied
  as a gather before and a scatter after the block product by :func:`to_block_sparse`.

Either way the masked model computes what the masked model computed before, up to
floating-point rounding. The returned :class:`Plan` saves to a regroup result file and
re-applies to a fresh copy of the model without recomputation.

A folded model is marked by a persistent buffer, ``regroup_folded`` (the fingerprint of
the folds), which travels with its state dict: a plan is never applied or folded twice,
and :func:`to_block_sparse` checks that the model was folded by its plan. A fresh
instance that is to receive a folded state dict registers the buffer first
(:func:`prepare_for_load`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

import regroup
from regroup import RegroupError
from regroup.allocation import allot, apply_allotment, layer_offer
from regroup.blocks import positions
from regroup.io import layer_pattern
from regroup.options import RegroupOptions, resolve_options
from regroup.provenance import tool_versions
from regroup.result import LayerResult, load_result, save_result

from .graph import DimAnalysis, hidden_dims
from .masking import mask_target, read_mask, stored_tensors, write_mask
from .sparse import BlockSparseConv2d, BlockSparseLinear

__all__ = ["Plan", "Fold", "regroup_model", "to_block_sparse", "layer_masks", "MODES",
           "FOLD_MARKER", "prepare_for_load", "fold_marker", "check_mode"]

MODES = ("fold", "runtime")

#: The buffer a folded model carries (persistent: it travels with the state dict).
FOLD_MARKER = "regroup_folded"


@dataclass
class Fold:
    """One folded hidden dimension: ``perm[i]`` is the original feature now at ``i``.

    ``consumers`` pairs each reading module with its kernel area (kh*kw; 1 for Linear),
    the width of one input feature in its flattened weight.
    """

    perm: np.ndarray
    producers: list[str]
    consumers: list[tuple[str, int]]
    norms: list[str]


def _fold_digest(folds: list[Fold]) -> int:
    """A nonzero 63-bit fingerprint of ``folds`` (0 for none): the fold marker's value."""
    if not folds:
        return 0
    h = hashlib.sha256()
    for f in folds:
        h.update(np.asarray(f.perm, np.int64).tobytes())
        h.update(json.dumps([f.producers, [[c, int(kk)] for c, kk in f.consumers],
                             f.norms]).encode())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1) or 1


def fold_marker(model: nn.Module) -> int:
    """The fold marker of ``model``: 0 when its parameters are in their original order,
    else the fingerprint of the folds permuting them (see :meth:`Plan.fold`)."""
    buf = dict(model.named_buffers(recurse=False)).get(FOLD_MARKER)
    return 0 if buf is None else int(buf)


def _check_marker_slot(model: nn.Module) -> None:
    if hasattr(model, FOLD_MARKER) and \
            FOLD_MARKER not in dict(model.named_buffers(recurse=False)):
        raise RegroupError(f"{type(model).__name__} has an attribute {FOLD_MARKER!r} that is "
                           "not regroup's fold marker; rename it to fold this model")


def _refuse_folded(model: nn.Module, caller: str | None = None) -> None:
    if fold_marker(model):
        raise RegroupError(f"{caller + ': ' if caller else ''}this model's parameters were "
                           "already permuted by a folding regroup plan (its "
                           f"{FOLD_MARKER!r} buffer is set); apply plans to a fresh model")


def prepare_for_load(model: nn.Module) -> nn.Module:
    """Register the fold marker on a fresh ``model`` (value 0: not folded), so that
    ``model.load_state_dict(folded.state_dict())`` restores it; returns ``model``.

    A folded model's state dict holds the marker (``regroup_folded``); loading it into
    an instance without the buffer fails with strict=True (an unexpected key) and drops
    it with strict=False, after which a second fold could not be detected.

    >>> fresh = prepare_for_load(Model())
    >>> fresh.load_state_dict(folded.state_dict())
    >>> plan.apply(fresh)                  # RegroupError: already permuted
    """
    _check_marker_slot(model)
    if FOLD_MARKER not in dict(model.named_buffers(recurse=False)):
        ref = next(iter(model.parameters()), None)
        model.register_buffer(FOLD_MARKER, torch.zeros((), dtype=torch.int64,
                                                       device=getattr(ref, "device", None)))
    return model


@dataclass
class Plan:
    """The regrouping of a model: per layer the layout, per hidden dimension the fold.

    Attributes
    ----------
    layers : dict of str to LayerResult
        Keyed by weight name (``"fc1.weight"``), layouts in the ORIGINAL coordinates.
    folds : list of Fold
    sides : dict of str to dict
        Per layer, how its rows and columns are ordered at run time: ``"fold"`` (folded
        into the model, nothing to do), ``"runtime"`` (gather / scatter), or ``"tiles"``
        (shuffled format: the kernel gathers its column tiles); ``"why_rows"`` /
        ``"why_cols"`` say why a side is not folded.
    skipped : dict of str to str
        Layers not regrouped, with the reason.
    notes : list of str
        Model-level findings (not traceable, weights used by parent modules, ...).
    options : RegroupOptions
        The options the layouts were made with.
    dense : dict of str to str
        Layers whose mask is applied but that stay dense modules, with the reason (their
        weight is used directly by a parent module, e.g. MultiheadAttention.out_proj).
    mode : {"fold", "runtime"}
        The mode of :func:`regroup_model` (a plan from a result file is "runtime").
    """

    layers: dict[str, LayerResult]
    folds: list[Fold] = field(default_factory=list)
    sides: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    options: RegroupOptions = field(default_factory=RegroupOptions)
    dense: dict[str, str] = field(default_factory=dict)
    mode: str = "runtime"

    # -- coordinates ---------------------------------------------------------------------
    def _maps(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        rows: dict[str, np.ndarray] = {}
        cols: dict[str, np.ndarray] = {}
        for f in self.folds:
            for name in f.producers:
                rows[name] = f.perm
            for name, kk in f.consumers:
                cols[name] = (f.perm[:, None] * kk + np.arange(kk)[None, :]).reshape(-1)
        return rows, cols

    def current_result(self, name: str) -> LayerResult:
        """Layer ``name``'s layout in the model's coordinates after folding (what
        :class:`BlockSparseLinear` needs); equal to ``layers[name]`` in runtime mode."""
        r = self.layers[name]
        module = name.rpartition(".")[0]
        rows, cols = self._maps()
        mask2d = r.mask2d
        row_perm, col_perm, panel_cols = r.row_perm, r.col_perm, r.panel_cols
        if module in rows:
            pi = rows[module]
            mask2d = mask2d[pi]
            row_perm = positions(pi)[row_perm]
        if module in cols:
            pi = cols[module]
            mask2d = mask2d[:, pi]
            pos = positions(pi)
            col_perm = None if col_perm is None else pos[col_perm]
            panel_cols = None if panel_cols is None else tuple(pos[c] for c in panel_cols)
        return replace(r, mask=mask2d.reshape(r.shape), row_perm=row_perm, col_perm=col_perm,
                       panel_cols=panel_cols)

    # -- applying ------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, rewind: Mapping[str, torch.Tensor] | None = None,
              permute: bool = True) -> None:
        """Refill the block masks into ``model`` and fold the permutations, in place.

        ``model`` must be in its original (unfolded) order: a fresh instance of the
        architecture the plan was made on, with its weights. ``rewind`` maps weight names
        to values to put under the masks (IMP-Regroup rewinds to early weights).
        ``permute=False`` sets the masks only; :meth:`fold` permutes later (an IMP loop
        keeps the original order so that rewinding stays valid).

        Each mask is set by :func:`~regroup.adapters.torch.masking.write_mask`: it
        replaces a torch.nn.utils.prune or torch.ao.pruning mask in place (refilled
        positions take the unmasked values), or prunes a plain weight.

        Raises
        ------
        RegroupError
            A layer or folded module is missing or has another shape, or the model's
            parameters were already permuted by a folding plan (its fold marker is set,
            also when loaded from a folded state dict, see :func:`prepare_for_load`);
            nothing is changed then.
        """
        self._check_unfolded(model)
        modules = dict(model.named_modules())
        staged = []
        for name, r in self.layers.items():
            module = _module(modules, name)
            w = mask_target(module, "weight")
            if tuple(w.shape) != tuple(r.shape):
                raise RegroupError(f"layer {name!r}: the plan has shape {tuple(r.shape)}, the "
                                   f"model's weight {tuple(w.shape)}")
            src = None
            if rewind is not None:
                src = _rewind_value(rewind, name)
                if src is not None and tuple(src.shape) != tuple(r.shape):
                    raise RegroupError(f"rewind value of {name!r} has shape "
                                       f"{tuple(src.shape)}, expected {tuple(r.shape)}")
            staged.append((module, r, src))
        self._check_fold_members(modules)
        for module, r, src in staged:
            write_mask(module, "weight", r.mask, src)
        if permute:
            self.fold(model)

    def fold(self, model: nn.Module) -> None:
        """Permute ``model``'s parameters by the plan's folds (masks follow), in place.
        The function of the model is unchanged.

        The model is then marked: a persistent buffer ``regroup_folded`` (a 0-d int64,
        the fingerprint of the folds) that travels with its state dict. A second
        :meth:`apply` or :meth:`fold` is refused, and :func:`to_block_sparse` checks
        that the model was folded by this plan. To reload a folded state dict into a
        fresh instance, register the buffer first with :func:`prepare_for_load`.
        """
        self._check_unfolded(model)
        modules = dict(model.named_modules())
        self._check_fold_members(modules)
        for f in self.folds:
            perm = torch.from_numpy(f.perm.astype(np.int64))
            for mod_name in f.producers:
                _permute(modules[mod_name], perm, 0, with_bias=True)
            for mod_name, _ in f.consumers:
                _permute(modules[mod_name], perm, 1, with_bias=False)
            for mod_name in f.norms:
                _permute_norm(modules[mod_name], perm)
        if self.folds:
            prepare_for_load(model)
            getattr(model, FOLD_MARKER).fill_(_fold_digest(self.folds))

    def _check_unfolded(self, model: nn.Module) -> None:
        _refuse_folded(model)
        if self.folds:
            _check_marker_slot(model)

    def _check_fold_members(self, modules: Mapping[str, nn.Module]) -> None:
        for f in self.folds:
            for mod_name in (*f.producers, *(c for c, _ in f.consumers), *f.norms):
                if mod_name not in modules:
                    raise RegroupError(f"folded module {mod_name!r} is not in the model")

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as a regroup result file (``regroup inspect`` reads it)."""
        meta = {"options": self.options.record(), "versions": tool_versions(), "plan": {
            "mode": self.mode, "sides": self.sides, "skipped": self.skipped,
            "notes": self.notes, "dense": self.dense,
            "folds": [{"perm": f.perm.tolist(), "producers": f.producers,
                       "consumers": [[c, kk] for c, kk in f.consumers], "norms": f.norms}
                      for f in self.folds]}}
        save_result(path, list(self.layers.values()), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`."""
        res = load_result(path)
        doc = res.meta.get("plan")
        if not isinstance(doc, dict):
            raise RegroupError(f"{os.fspath(path)}: a result file without a model plan (made "
                               "by `regroup run`?); use regroup.adapters.torch.apply_result")
        folds = [Fold(np.asarray(f["perm"], np.intp), list(f["producers"]),
                      [(c, int(kk)) for c, kk in f["consumers"]], list(f["norms"]))
                 for f in doc["folds"]]
        # Plans written before RegroupOptions kept the options (and mode) in "plan".
        record = res.meta.get("options", doc.get("options", {}))
        mode = doc.get("mode", doc.get("options", {}).get("mode", "fold"))
        return cls(dict(res), folds, doc["sides"], doc["skipped"], doc["notes"],
                   _recorded_options(record, path), doc["dense"], mode)

    @classmethod
    def from_result(cls, result: str | os.PathLike | Mapping[str, LayerResult]) -> Plan:
        """A runtime plan from a ``regroup run`` result file (or its loaded mapping): every
        layer keeps its own orders, applied by :func:`to_block_sparse` at run time.

        >>> plan = Plan.from_result("model.regroup.npz")
        >>> plan.apply(model)                  # refilled masks, through torch.nn.utils.prune
        >>> to_block_sparse(model, plan)
        """
        res = load_result(result) if isinstance(result, (str, os.PathLike)) else result
        meta = getattr(res, "meta", {})
        why = "orders from a result file (layers regrouped independently)"
        sides = {name: {"rows": "runtime", "why_rows": why,
                        **({"cols": "runtime", "why_cols": why} if r.format == "grid"
                           else {"cols": "tiles"})}
                 for name, r in res.items()}
        skipped = {s["name"]: s["reason"] for s in meta.get("skipped", [])}
        where = result if isinstance(result, (str, os.PathLike)) else "the result"
        return cls(dict(res), [], sides, skipped, [],
                   _recorded_options(meta.get("options", {}), where), {}, "runtime")

    def report(self) -> str:
        """A table: layer, shape, method chosen, retained (and identity's), row / column
        handling; then skipped layers and notes."""
        lines = [(f"{'layer':32s} {'shape':>16s} {'chosen':>24s} {'retained':>8s} "
                  f"{'ident.':>7s} {'rows':>8s} {'cols':>8s}")]
        for name, r in self.layers.items():
            s = self.sides.get(name, {})
            lines.append(f"{name[:32]:32s} {'x'.join(map(str, r.shape)):>16s} "
                         f"{str(r.metrics.get('chosen'))[:24]:>24s} "
                         f"{r.metrics['retained']:8.4f} {r.metrics['retained_identity']:7.4f} "
                         f"{s.get('rows', '-'):>8s} {s.get('cols', '-'):>8s}")
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _recorded_options(record: Mapping[str, Any], where: Any) -> RegroupOptions:
    try:
        return RegroupOptions.from_record(record)
    except (TypeError, ValueError) as exc:
        raise RegroupError(f"{os.fspath(where) if isinstance(where, os.PathLike) else where}: "
                           f"the recorded options are not valid ({exc})") from None


# -- helpers on live modules -------------------------------------------------------------
def _module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    mod_name, _, attr = name.rpartition(".")
    module = modules.get(mod_name)
    if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise RegroupError(f"layer {name!r}: no Linear or Conv2d named {mod_name!r} in the "
                           "model")
    return module


def layer_masks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """``{weight name: (masked weight, mask, source)}`` for every Linear / Conv2d.

    The source is ``"prune"`` (torch.nn.utils.prune's ``weight_mask``), ``"ao"`` (a
    torch.ao.pruning parametrization's mask) or ``"zeros"`` (the weight's nonzeros); see
    :func:`~regroup.adapters.torch.masking.read_mask`.
    """
    return {name + ".weight": read_mask(m, "weight") for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name}


def _rewind_value(rewind: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    mod = name[: -len(".weight")]
    for key in (name, name + "_orig", mod + ".parametrizations.weight.original"):
        if key in rewind:
            return rewind[key]
    return None


def _permute(module: nn.Module, perm: torch.Tensor, dim: int, with_bias: bool) -> None:
    with torch.no_grad():
        for t in stored_tensors(module, "weight"):
            t.copy_(t.index_select(dim, perm.to(t.device)))
        if with_bias and getattr(module, "bias", None) is not None:
            b = module.bias
            b.copy_(b.index_select(0, perm.to(b.device)))


def _permute_norm(module: nn.Module, perm: torch.Tensor) -> None:
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, key, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                t.copy_(t.index_select(0, perm.to(t.device)))


# -- planning ----------------------------------------------------------------------------
def _kk(module: nn.Module) -> int:
    return int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1


def _joint_pattern(dim, patterns: dict[str, regroup.Pattern], modules) -> sp.csr_matrix | None:
    """Channels x (producer inputs + consumer outputs), each layer scaled to total 1."""
    parts = []
    for name in dim.producers:
        p = patterns.get(name + ".weight")
        if p is not None:
            parts.append(p.matrix)
    for name in dim.consumers:
        p = patterns.get(name + ".weight")
        if p is not None:
            kk = _kk(modules[name])
            M = p.matrix.tocoo()
            # (out, C*kk) -> (C, out*kk): channel c's column j*kk+k is weight [j, c, k].
            parts.append(sp.csr_matrix((M.data, (M.col // kk, M.row * kk + M.col % kk)),
                                       shape=(dim.size, M.shape[0] * kk)))
    parts = [P / (P.sum() or 1.0) for P in parts if P.nnz]
    return sp.hstack(parts).tocsr() if parts else None


def check_mode(mode: Any, example_inputs: Any, caller: str) -> None:
    """Refuse a ``mode`` not in :data:`MODES`, and "fold" without ``example_inputs``
    (errors name ``caller``)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"The 'mode' parameter of {caller} must be one of {MODES}. Got "
                         f"{mode!r} instead.")
    if mode == "fold" and example_inputs is None:
        raise RegroupError(f"{caller}(mode='fold') traces the model to find where "
                           "permutations fold: pass example_inputs=(x,), or use "
                           "mode='runtime'")


def regroup_model(model: nn.Module, *, options: RegroupOptions | None = None,
                  mode: str = "fold", example_inputs: Any = None,
                  rewind: Mapping[str, torch.Tensor] | None = None, permute: bool = True,
                  **kwargs: Any) -> Plan:
    """Regroup every pruned Linear / Conv2d of ``model`` and apply the result in place.

    Parameters
    ----------
    model : nn.Module
        Pruned with torch.nn.utils.prune, torch.ao.pruning, or by zeroing weights.
        Modified in place (masks refilled, permutations folded); deep-copy it first to
        keep the original.
    options : RegroupOptions, optional
        How layers are regrouped (block, format, method, budget, seed, ...). ``layers``
        are globs over weight names (``"encoder.*"``, ``"fc1.weight"``; default: every
        pruned layer); ``budget_scope="global"`` spends one budget over all selected
        layers (``layer_min`` reserves a share of each layer's own), the folded orders
        staying fixed.
    mode : {"fold", "runtime"}, default="fold"
        See the module docstring. "fold" needs ``example_inputs`` to trace the model.
    example_inputs : tensor or tuple of tensors
        Inputs to trace the model with (shapes only; a batch of 1-2 is enough).
    rewind : mapping of weight name to tensor, optional
        Values to put under the refilled masks (IMP-Regroup rewinds to early weights);
        default: the layer's current unmasked values (``weight_orig`` under prune).
    permute : bool, default=True
        In fold mode, permute the parameters now; False plans fold-compatible layouts
        but sets the masks only, leaving ``plan.fold(model)`` for later (an IMP loop
        rewinds in the original order).
    **kwargs
        Fields of :class:`regroup.RegroupOptions`, applied on top of ``options``
        (``regroup_model(model, block=16, method="metis", example_inputs=(x,))``).

    Returns
    -------
    Plan
        ``plan.report()`` summarises it; ``plan.save(path)`` / ``Plan.load(path)``;
        :func:`to_block_sparse` swaps in block-sparse modules.

    Raises
    ------
    RegroupError
        No pruned layer, ``layers`` matching no weight, fold mode without example inputs,
        a model already folded (see :meth:`Plan.fold`).
    ValueError, TypeError
        Invalid options or mode (before anything is changed).
    """
    caller = "regroup_model"
    opts = resolve_options(options, caller, **kwargs)
    check_mode(mode, example_inputs, caller)
    _refuse_folded(model, caller)
    where = type(model).__name__
    modules = dict(model.named_modules())
    found = layer_masks(model)
    patterns: dict[str, regroup.Pattern] = {}
    skipped: dict[str, str] = {}
    for name in opts.select(list(found), where=where):
        w, mask, _ = found[name]
        pattern, why = layer_pattern(name, w.cpu().double().numpy(), mask.cpu().numpy(),
                                     source=where, block=opts.block)
        if pattern is None:
            skipped[name] = why
        else:
            patterns[name] = pattern
    if not patterns:
        raise RegroupError(f"{where} has no pruned Linear or Conv2d layer to regroup "
                           f"(skipped: {skipped or 'none found'})")
    notes: list[str] = []
    analysis: DimAnalysis | None = None
    if mode == "fold":
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        was_training = model.training
        model.eval()      # tracing runs the model: keep BatchNorm statistics untouched
        try:
            analysis = hidden_dims(model, inputs)
        finally:
            model.train(was_training)
        if not analysis.traced:
            msg = (f"torch.fx could not trace {where} ({analysis.error}); every layer uses "
                   "runtime permutations")
            warnings.warn(f"regroup_model: {msg}", RuntimeWarning, stacklevel=2)
            notes.append(msg)
        for name, why in analysis.uncalled.items():
            notes.append(f"{name}: {why}; its mask is applied, it stays dense")
    folds: list[Fold] = []
    fixed_rows: dict[str, np.ndarray] = {}
    fixed_cols: dict[str, np.ndarray] = {}
    dim_of_side: dict[tuple[str, str], Any] = {}
    if analysis is not None:
        # One order per hidden dimension, chosen on its joint pattern: only the row
        # order of a shuffled layout is used, and short edge panels are fine there.
        joint_opts = opts.replace(caller, format="shuffled", edge="partial").per_layer()
        for name, (i, o) in analysis.layer_dims.items():
            dim_of_side[(name, "cols")] = analysis.dims[i]
            dim_of_side[(name, "rows")] = analysis.dims[o]
        for dim in analysis.dims:
            if not dim.foldable:
                continue
            joint = _joint_pattern(dim, patterns, modules)
            if joint is None:
                continue
            if dim.size <= opts.block[0]:
                continue          # one panel: every order is the same
            jp = regroup.from_sparse(joint, name=f"hidden dimension of {dim.producers[0]}")
            pi = regroup.regroup_pattern(jp, options=joint_opts).row_perm
            folds.append(Fold(pi, list(dim.producers),
                              [(c, _kk(modules[c])) for c in dim.consumers], list(dim.norms)))
            for p in dim.producers:
                fixed_rows[p] = pi
            for c in dim.consumers:
                kk = _kk(modules[c])
                fixed_cols[c] = (pi[:, None] * kk + np.arange(kk)[None, :]).reshape(-1)
    results: dict[str, LayerResult] = {}
    sides: dict[str, dict[str, str]] = {}
    grid = opts.format == "grid"
    for name, pattern in patterns.items():
        mod = name[: -len(".weight")]
        rp = fixed_rows.get(mod)
        cp = fixed_cols.get(mod) if grid else None
        # Annealing moves rows: a folded row order is not the layer's to move.
        layer_opts = opts.per_layer() if rp is None else opts.per_layer().replace(
            caller, anneal=None)
        results[name] = regroup.regroup_pattern(pattern, options=layer_opts,
                                                row_perm=rp, col_perm=cp)
        side = {"rows": "fold" if rp is not None else "runtime",
                "cols": ("fold" if cp is not None else "runtime") if grid else "tiles"}
        for s in ("rows", "cols"):
            if side[s] == "runtime":
                side["why_" + s] = _why(mode, analysis, dim_of_side.get((mod, s)), mod)
        sides[name] = side
    if opts.budget_scope == "global":
        names = list(results)
        kept = allot([layer_offer(patterns[n], results[n]) for n in names], opts.budget,
                     layer_min=opts.layer_min)
        for n, k in zip(names, kept, strict=True):
            # Refinement at the allotted area moves only the sides that are not folded.
            results[n] = apply_allotment(patterns[n], results[n], k, opts.budget,
                                         layer_min=opts.layer_min, refine=opts.refines,
                                         rows=sides[n]["rows"] != "fold",
                                         cols=sides[n]["cols"] != "fold",
                                         time_limit=opts.time_limit)
    if opts.anneal is not None and fixed_rows:
        notes.append("anneal: applied to the layers whose rows are not folded (a folded "
                     "row order is shared with other layers)")
    dense = {} if analysis is None else {
        f"{m}.weight": why for m, why in analysis.uncalled.items() if f"{m}.weight" in results}
    plan = Plan(results, folds, sides, skipped, notes, opts, dense, mode)
    plan.apply(model, rewind=rewind, permute=permute)
    return plan


def _why(mode: str, analysis: DimAnalysis | None, dim, mod: str) -> str:
    if mode == "runtime":
        return "mode='runtime'"
    if analysis is not None and mod in analysis.uncalled:
        return analysis.uncalled[mod]
    if dim is None:
        return "not found in the traced graph"
    if dim.reasons:
        return "; ".join(dict.fromkeys(dim.reasons))
    if not dim.producers:
        return "no producing layer"
    if not dim.consumers:
        return "no consuming layer"
    return f"one panel covers all {dim.size} features"


def to_block_sparse(model: nn.Module, plan: Plan, *, backend: str = "auto"
                    ) -> dict[str, str]:
    """Replace the planned Linear / Conv2d modules of a regrouped ``model`` (after
    :func:`regroup_model` or :meth:`Plan.apply`) by block-sparse modules, in place.

    The model's fold marker (see :meth:`Plan.fold`) must be this plan's: a folding plan
    needs the model folded by it, a runtime plan an unfolded model.

    Returns ``{weight name: what happened}``: ``"BlockSparseLinear"`` /
    ``"BlockSparseConv2d"``, or why the layer stays dense-masked (a module whose weight a
    parent uses directly; a grouped convolution).
    """
    marker, want = fold_marker(model), _fold_digest(plan.folds)
    if marker != want:
        if not marker:
            raise RegroupError("to_block_sparse: the plan folds permutations into the model, "
                               "but this model was not permuted; call plan.fold(model) "
                               "first")
        raise RegroupError("to_block_sparse: this model's parameters were permuted by "
                           + ("another folding plan" if want else "a folding plan, and this "
                              "plan keeps the original order")
                           + "; use the plan that folded it")
    modules = dict(model.named_modules())
    out = {}
    for name in plan.layers:
        mod_name, _, _ = name.rpartition(".")
        module = modules[mod_name]
        if name in plan.dense:
            out[name] = f"stays dense-masked: {plan.dense[name]}"
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(
                module.padding, str) or module.padding_mode != "zeros"):
            out[name] = ("stays dense-masked: BlockSparseConv2d needs groups=1, numeric "
                         "padding and zero padding mode")
            continue
        r = plan.current_result(name)
        weight = module.weight.detach()
        holder = _parent(model, mod_name)
        if isinstance(module, nn.Linear):
            new: nn.Module = BlockSparseLinear(r, weight, module.bias, backend=backend)
        else:
            new = BlockSparseConv2d(r, module, backend=backend)
        setattr(holder, mod_name.rpartition(".")[2], new)
        out[name] = type(new).__name__
    return out


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model

