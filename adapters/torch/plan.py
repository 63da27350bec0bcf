"""Regroup a live PyTorch model: plan every layer, refill its block mask, fold permutations.

:func:`regroup_model` reads each layer's mask from the model (a torch.nn.utils.prune
reparametrization, a torch.ao.pruning parametrization, or the zeros of the weight),
regroups it with the core engine and applies the refilled block masks in place. The
layers are the weights of Linear and ungrouped Conv2d modules and the packed
``in_proj_weight`` (q|k|v rows) of ``nn.MultiheadAttention`` (see :func:`layer_masks`);
grouped / depthwise convolutions are skipped with the reason (no block kernel runs them).
Row and column orders are then made free where possible:

- ``mode="fold"``: every hidden dimension that can be permuted exactly (see
  :mod:`.graph`) gets one order, chosen on the joint pattern of its producers' rows and
  its consumers' columns, and the model's parameters are permuted in place (producer rows
  and bias, norm parameters and running stats, consumer columns). Nothing runs at
  inference for those sides. The other sides keep a runtime permutation.
- ``mode="runtime"``: parameters stay in place; every layer keeps its own orders, applied
  as a gather before and a scatter after the block product by :func:`to_block_sparse`.

With ``format="nm"`` every selected layer (dense ones too) is pruned to N:M along its
input columns after a searched order; in fold mode each hidden dimension gets one order,
searched on all its consumers together and folded into its producers, so the folded
consumers are N:M in plain order (:func:`to_block_sparse` then makes their Linear layers
:class:`~regroup.adapters.torch.NMLinear`).

Either way the masked model computes what the masked model computed before, up to
floating-point rounding. ``in_proj_weight`` always keeps runtime orders (its rows are
split into heads inside the attention module). The returned :class:`Plan` saves to a
regroup result file and re-applies to a fresh copy of the model without recomputation.

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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

import regroup
from regroup import RegroupError
from regroup.allocation import allot, apply_allotment, layer_offer
from regroup.blocks import build_layout, layout_mask, positions
from regroup.engine import objective_matrix
from regroup.io import layer_pattern
from regroup.metrics import layer_metrics, retained
from regroup.nm import run_nm_method
from regroup.options import CHAIN_AUTO, RegroupOptions, resolve_options
from regroup.provenance import tool_versions
from regroup.refine import refine_shared
from regroup.result import LayerResult, load_result, save_result
from regroup.validation import check_choice

from ._holders import Holders, refuse_meta
from ._journal import Journal, atomic, training_flags
from .calibration import check_scales, input_scales, input_scales_targets
from .graph import DimAnalysis, hidden_dims
from .masking import (journaled_write_mask, mask_problem, mask_target, permute_problem,
                      read_mask, stored_slots)
from .semi_structured import NM_BACKENDS, NMLinear
from .sparse import (BACKENDS, BlockSparseConv2d, BlockSparseLinear,
                     BlockSparseMultiheadAttention)

__all__ = ["Plan", "Fold", "regroup_model", "to_block_sparse", "layer_masks", "MODES",
           "FOLD_MARKER", "prepare_for_load", "fold_marker", "check_mode"]

MODES = ("fold", "runtime")

#: The buffer a folded model carries (persistent: it travels with the state dict).
FOLD_MARKER = "regroup_folded"


@dataclass
class Fold:
    """One folded hidden dimension: ``perm[i]`` is the original feature now at ``i``.

    ``consumers`` pairs each reading module with its kernel area (kh*kw; 1 for Linear),
    the width of one input feature in its flattened weight. ``norms`` are the channel-wise
    modules permuted along their first axis: BatchNorm / LayerNorm and depthwise
    convolutions (see :class:`~regroup.adapters.torch.graph.HiddenDim`).
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
        ``"why_cols"`` say why a side is not folded. N:M layers (format "nm") have
        ``"cols"`` only: N:M orders no rows.
    skipped : dict of str to str
        Layers not regrouped, with the reason.
    notes : list of str
        Model-level findings (not traceable, weights used by parent modules, ...).
    options : RegroupOptions
        The options the layouts were made with.
    dense : dict of str to str
        Layers whose mask is applied but that stay dense modules, with the reason: a
        parent module reads their weight directly (the ``out_proj`` of a
        MultiheadAttention that cannot become a BlockSparseMultiheadAttention; the
        ``linear1`` / ``linear2`` of a TransformerEncoderLayer whose fused fast path stays
        on; in fold mode, a layer the trace never sees called as a module, or whose
        weight the forward reads itself).
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
            # N:M orders no rows: its row order stays the identity.
            row_perm = row_perm if r.format == "nm" else positions(pi)[row_perm]
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

        All or nothing: every layer and fold is checked first, and a failure part-way
        through (an exception of any kind) undoes what was done, so the model keeps its
        tensors bit for bit, its parameters, buffers, hooks and module classes.

        Raises
        ------
        RegroupError
            A layer or folded module is missing or has another shape, two layer names are
            one tensor, a weight cannot be masked (a parametrization other than
            torch.ao.pruning's, such as weight_norm) or permuted (tied to a tensor the fold
            does not permute the same way), a fold's order is not a permutation, a tensor
            is on the meta device, or the model's parameters were already permuted by a
            folding plan (its fold marker is set, also when loaded from a folded state
            dict, see :func:`prepare_for_load`); nothing is changed then.
        """
        self._check_unfolded(model)
        refuse_meta(model, "Plan.apply")
        modules = _all_paths(model)
        staged = []
        where: dict[tuple[int, str], str] = {}
        for name, r in self.layers.items():
            module, attr = _layer_tensor(modules, name)
            if (id(module), attr) in where:
                raise RegroupError(f"layers {where[(id(module), attr)]!r} and {name!r} of the "
                                   "plan are one tensor of the model (a module reached by "
                                   "two paths): one mask would replace the other")
            where[(id(module), attr)] = name
            try:
                w = mask_target(module, attr)
            except RegroupError as exc:
                raise RegroupError(f"layer {name!r}: {exc}") from None
            if tuple(w.shape) != tuple(r.shape):
                raise RegroupError(f"layer {name!r}: the plan has shape {tuple(r.shape)}, the "
                                   f"model's weight {tuple(w.shape)}")
            if tuple(np.shape(r.mask)) != tuple(r.shape):
                raise RegroupError(f"layer {name!r}: the plan's mask has shape "
                                   f"{tuple(np.shape(r.mask))}, its layer {tuple(r.shape)}")
            src = None
            if rewind is not None:
                src = _rewind_value(rewind, name)
                if src is not None and tuple(src.shape) != tuple(r.shape):
                    raise RegroupError(f"rewind value of {name!r} has shape "
                                       f"{tuple(src.shape)}, expected {tuple(r.shape)}")
            staged.append((name, module, attr, r, src, w))
        _check_shared_rewinds(staged)
        if permute:
            self._check_folds(model, modules)
        else:
            self._check_fold_members(modules)
        with atomic() as journal:
            for _, module, attr, r, src, _ in staged:
                journaled_write_mask(journal, module, attr, r.mask, src)
            if permute:
                self._fold(model, journal)

    def fold(self, model: nn.Module) -> None:
        """Permute ``model``'s parameters by the plan's folds (masks follow), in place.
        The function of the model is unchanged.

        The model is then marked: a persistent buffer ``regroup_folded`` (a 0-d int64,
        the fingerprint of the folds) that travels with its state dict. A second
        :meth:`apply` or :meth:`fold` is refused, and :func:`to_block_sparse` checks
        that the model was folded by this plan. To reload a folded state dict into a
        fresh instance, register the buffer first with :func:`prepare_for_load`.

        All or nothing, as :meth:`apply`: every fold is checked first (its members exist
        and are of their kind and size, its order is a permutation, no tensor it permutes
        is tied to one it does not permute the same way, none is parametrized other
        than by masks or on the meta device; RegroupError otherwise), and any failure
        after undoes every permutation.
        """
        self._check_unfolded(model)
        refuse_meta(model, "Plan.fold")
        with atomic() as journal:
            self._fold(model, journal)

    def _fold(self, model: nn.Module, journal: Journal) -> None:
        """Check the folds on the model as it is now, then permute through ``journal``."""
        modules = _all_paths(model)
        self._check_folds(model, modules)
        for f in self.folds:
            perm = torch.from_numpy(np.asarray(f.perm, dtype=np.int64))
            touches, _ = _fold_touches(modules, f.producers, f.consumers, f.norms)
            done: set[tuple[int, int]] = set()
            for _, owner, key, axis in touches:
                t = getattr(owner, key)
                if (id(t), axis) not in done:         # tied slots: one tensor, once
                    done.add((id(t), axis))
                    journal.permute(t, axis, perm)
        if self.folds:
            journal.module(model)
            prepare_for_load(model)
            marker = getattr(model, FOLD_MARKER)
            journal.values(marker)
            marker.fill_(_fold_digest(self.folds))

    def _check_unfolded(self, model: nn.Module) -> None:
        _refuse_folded(model)
        if self.folds:
            _check_marker_slot(model)

    def _check_fold_members(self, modules: Mapping[str, nn.Module]) -> None:
        for f in self.folds:
            for mod_name in (*f.producers, *(c for c, _ in f.consumers), *f.norms):
                if mod_name not in modules:
                    raise RegroupError(f"folded module {mod_name!r} is not in the model")

    def _check_folds(self, model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
        """Everything :meth:`fold` needs, checked before anything changes (RegroupError)."""
        self._check_fold_members(modules)
        if not self.folds:
            return
        holders = Holders(model)
        seen: dict[tuple[int, int], str] = {}
        for k, f in enumerate(self.folds):
            what = f"fold {k} (producers {f.producers})"
            perm = np.asarray(f.perm)
            if perm.ndim != 1 or perm.dtype.kind not in "iu" or \
                    not np.array_equal(np.sort(perm), np.arange(perm.size)):
                raise RegroupError(f"{what}: its order is not a permutation of "
                                   f"0..{perm.size - 1} (shape {perm.shape}, dtype "
                                   f"{perm.dtype})")
            roles = [(p, 0, "producer") for p in f.producers] + \
                [(c, 1, "consumer") for c, _ in f.consumers] + [(n, 0, "norm") for n in f.norms]
            for mod_name, axis, role in roles:
                module = modules[mod_name]
                if role == "norm":
                    ok = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) \
                        or isinstance(module, nn.Conv2d) and module.groups > 1
                else:
                    ok = isinstance(module, (nn.Linear, nn.Conv2d))
                if not ok:
                    raise RegroupError(f"{what}: {role} {mod_name!r} is a "
                                       f"{type(module).__name__}, not a module a fold permutes")
                prev = seen.get((id(module), axis))
                if prev is not None:
                    raise RegroupError(f"{what}: {mod_name!r} is permuted along axis {axis} "
                                       f"by {prev} too")
                seen[(id(module), axis)] = what
            for c, kk in f.consumers:
                if kk != _kk(modules[c]):
                    raise RegroupError(f"{what}: consumer {c!r} has kernel area "
                                       f"{_kk(modules[c])}, the plan says {kk}")
            problems = _fold_problems(modules, holders, f.producers, f.consumers, f.norms,
                                      perm.size)
            if problems:
                raise RegroupError(f"{what}: cannot be folded: {problems[0]}")

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
        sides = {name: {"cols": "runtime", "why_cols": why} if r.format == "nm" else
                 {"rows": "runtime", "why_rows": why,
                  **({"cols": "runtime", "why_cols": why} if r.format == "grid"
                     else {"cols": "tiles"})}
                 for name, r in res.items()}
        skipped = {s["name"]: s["reason"] for s in meta.get("skipped", [])}
        where = result if isinstance(result, (str, os.PathLike)) else "the result"
        return cls(dict(res), [], sides, skipped, [],
                   _recorded_options(meta.get("options", {}), where), {}, "runtime")

    def report(self) -> str:
        """A table: layer, shape, method chosen, retained (and identity's; for N:M layers
        the share of |w|), row / column handling; then skipped layers, layers that stay
        dense modules, and notes."""
        lines = [(f"{'layer':32s} {'shape':>16s} {'chosen':>24s} {'retained':>8s} "
                  f"{'ident.':>7s} {'rows':>8s} {'cols':>8s}")]
        for name, r in self.layers.items():
            s = self.sides.get(name, {})
            # N:M keeps N of every M whatever the order: its count share says nothing.
            key = "retained_magnitude" if r.format == "nm" and \
                r.metrics.get("objective") == "magnitude" else "retained"
            lines.append(f"{name[:32]:32s} {'x'.join(map(str, r.shape)):>16s} "
                         f"{str(r.metrics.get('chosen'))[:24]:>24s} "
                         f"{r.metrics[key]:8.4f} {r.metrics[key + '_identity']:7.4f} "
                         f"{s.get('rows', '-'):>8s} {s.get('cols', '-'):>8s}")
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        lines += [f"stays dense {k}: {v}" for k, v in self.dense.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _recorded_options(record: Mapping[str, Any], where: Any) -> RegroupOptions:
    # A plan recorded before the chain option was planned without it.
    record = {"chain": None, **record}
    try:
        return RegroupOptions.from_record(record)
    except (TypeError, ValueError) as exc:
        raise RegroupError(f"{os.fspath(where) if isinstance(where, os.PathLike) else where}: "
                           f"the recorded options are not valid ({exc})") from None


# -- helpers on live modules -------------------------------------------------------------
def _packed_mha(module: nn.Module) -> bool:
    """An nn.MultiheadAttention with one packed (3E x E) ``in_proj_weight``."""
    return isinstance(module, nn.MultiheadAttention) and \
        bool(getattr(module, "_qkv_same_embed_dim", False))


def _layer_tensor(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str]:
    """The module and tensor attribute of layer ``name`` (``"fc.weight"``,
    ``"attn.in_proj_weight"``)."""
    mod_name, _, attr = name.rpartition(".")
    module = modules.get(mod_name)
    if attr == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
        return module, attr
    if attr == "in_proj_weight" and _packed_mha(module):
        return module, attr
    raise RegroupError(f"layer {name!r}: no Linear or Conv2d weight, nor MultiheadAttention "
                       f"in_proj_weight, named so in the model")


def layer_masks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """``{layer name: (masked weight, mask, source)}`` for every Linear / Conv2d weight
    (``"fc.weight"``) and every packed ``nn.MultiheadAttention.in_proj_weight``
    (``"attn.in_proj_weight"``, 3E x E, rows q|k|v; not when kdim / vdim differ from
    embed_dim), in module order. Embeddings and other modules are never layers.

    The source is ``"prune"`` (torch.nn.utils.prune's ``weight_mask``), ``"ao"`` (a
    torch.ao.pruning parametrization's mask) or ``"zeros"`` (the weight's nonzeros); see
    :func:`~regroup.adapters.torch.masking.read_mask`.

    Raises
    ------
    RegroupError
        A tensor of the model is on the meta device, or a layer's weight is parametrized
        other than by torch.ao.pruning's masks (``weight_norm``; see
        :func:`~regroup.adapters.torch.masking.mask_problem`), naming it.
    """
    refuse_meta(model, "layer_masks")
    out = {}
    for name, (m, attr) in _layer_modules(model).items():
        why = mask_problem(m, attr)
        if why is not None:
            raise RegroupError(f"layer_masks: layer {name!r}: cannot read its mask: {why}")
        out[name] = read_mask(m, attr)
    return out


def _all_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` under every path that reaches it (a plan may name a
    module reached by two paths by either)."""
    return dict(model.named_modules(remove_duplicate=False))


def _layer_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{layer name: (module, tensor attribute)}`` of :func:`layer_masks`, in module
    order (a module reached by two paths once, under its first)."""
    out = {}
    for name, m in model.named_modules():
        if not name:
            continue          # the model itself: to_block_sparse cannot replace it
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name + ".weight"] = (m, "weight")
        elif _packed_mha(m):
            out[name + ".in_proj_weight"] = (m, "in_proj_weight")
    return out


def _not_regroupable(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """Why layer ``name`` is not worth regrouping whatever its mask, or None."""
    mod_name, _, attr = name.rpartition(".")
    module = modules[mod_name]
    why = mask_problem(module, attr)
    if why is not None:
        return f"its mask cannot be read or set: {why}"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return (f"{kind} convolution (groups={module.groups}): no block-sparse kernel runs "
                "it, so a block mask would change its weights for nothing; left as pruned")
    return None


#: torch.nn modules whose use of their child layers is known (:func:`kept_dense`).
_KNOWN_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _in_known_parent(modules: Mapping[str, nn.Module], mod_name: str) -> bool:
    parent = mod_name.rpartition(".")[0]
    return bool(mod_name) and isinstance(modules.get(parent), _KNOWN_PARENTS)


def _encoder_fast_path(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether ``layer``'s fused fast path (``torch._transformer_encoder_layer_fwd``) may
    run, conservatively: torch checks these ``self_attn`` flags before it reads
    ``linear1.weight`` and ``linear2.weight`` as tensors. Its other conditions (per call:
    training, input, hooks; per layer: an odd head count, an activation other than
    relu/gelu, norms with different eps) are not checked, so a layer whose fast path would
    never run may still be reported as keeping its feed-forward dense."""
    sa = layer.self_attn
    return bool(getattr(sa, "batch_first", False)) and \
        getattr(sa, "in_proj_bias", None) is not None and \
        bool(getattr(sa, "_qkv_same_embed_dim", False))


def kept_dense(modules: Mapping[str, nn.Module], planned: Collection[str],
                nm: Collection[str] = ()) -> dict[str, str]:
    """The ``planned`` layers that must stay dense-masked modules, with the reason: their
    weight is read directly by a torch.nn parent (found without tracing).

    - ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself; one whose
      ``in_proj_weight`` or ``out_proj`` is planned becomes a
      BlockSparseMultiheadAttention, unless :meth:`BlockSparseMultiheadAttention.unsupported`
      says why not (then both stay dense). The model itself cannot be replaced.
    - ``nn.TransformerEncoderLayer``'s fused fast path reads ``linear1.weight`` and
      ``linear2.weight``; it is off when its ``self_attn`` becomes block-sparse (see
      BlockSparseMultiheadAttention) or its flags turn it off (:func:`_encoder_fast_path`).
    - ``nm`` (the planned N:M layers): an N:M projection of a MultiheadAttention stays
      dense (BlockSparseMultiheadAttention runs block layouts), and does not make the
      attention block-sparse.
    """
    out: dict[str, str] = {}
    replaced: set[str] = set()
    for name, m in modules.items():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        mine = [w for w in (_join(name, "in_proj_weight"), _join(name, "out_proj.weight"))
                if w in planned]
        for w in (w for w in mine if w in nm):
            out[w] = ("N:M inside a MultiheadAttention, which reads its weights directly: "
                      "BlockSparseMultiheadAttention runs block layouts only")
        mine = [w for w in mine if w not in nm]
        why = BlockSparseMultiheadAttention.unsupported(m)
        if why is None and not name:
            why = "the model itself is a MultiheadAttention (only submodules are replaced)"
        if why is None:
            if mine:
                replaced.add(name)
            continue
        for w in mine:
            out[w] = f"{why}; MultiheadAttention {name!r} reads its weight directly"
    for name, m in modules.items():
        if not isinstance(m, nn.TransformerEncoderLayer) or not _encoder_fast_path(m) or \
                _join(name, "self_attn") in replaced:
            continue
        for lin in ("linear1", "linear2"):
            w = _join(name, f"{lin}.weight")
            if w in planned:
                out[w] = (f"TransformerEncoderLayer {name!r} reads it directly in its fused "
                          "fast path, which stays on while its self_attn is a dense "
                          "MultiheadAttention" + (" (N:M does not replace it)" if nm else
                                                  " (plan self_attn's in_proj_weight or "
                                                  "out_proj too)"))
    return out


def _rewind_value(rewind: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The rewind value of layer ``name`` under any of its state-dict names; two different
    tensors under two of them are ambiguous (RegroupError naming both keys)."""
    mod, _, attr = name.rpartition(".")
    keys = [k for k in (name, name + "_orig", f"{mod}.parametrizations.{attr}.original")
            if k in rewind]
    for k in keys[1:]:
        if rewind[k] is not rewind[keys[0]]:
            raise RegroupError(f"rewind has both {keys[0]!r} and {k!r}, two tensors for layer "
                               f"{name!r}; keep the one to rewind to")
    return rewind[keys[0]] if keys else None


def _check_shared_rewinds(staged: list[tuple]) -> None:
    """Two layers sharing one weight tensor (tied) with different rewind values: the
    second would silently overwrite the first."""
    first: dict[int, tuple[str, Any]] = {}
    for name, _, _, _, src, target in staged:
        if src is None:
            continue
        prev = first.setdefault(id(target), (name, src))
        if prev[0] != name and not torch.equal(torch.as_tensor(prev[1]).cpu(),
                                               torch.as_tensor(src).cpu()):
            raise RegroupError(f"layers {prev[0]!r} and {name!r} share one weight tensor "
                               "(tied), and their rewind values differ")


def _fold_touches(modules: Mapping[str, nn.Module], producers: Iterable[str],
                  consumers: Iterable[tuple[str, int]], norms: Iterable[str]
                  ) -> tuple[list[tuple[str, nn.Module, str, int]], list[str]]:
    """``(member, owner module, attribute, axis)`` of every tensor slot a fold permutes
    (producers' weights with their masks and bias along axis 0, consumers' weights along
    axis 1, norms' parameters and running stats along axis 0), and why some cannot be
    permuted in place (:func:`~regroup.adapters.torch.masking.permute_problem`)."""
    out: list[tuple[str, nn.Module, str, int]] = []
    problems: list[str] = []

    def take(member: str, module: nn.Module, key: str, axis: int) -> None:
        why = permute_problem(module, key)
        if why is not None:
            problems.append(f"{_join(member, key)!r}: {why}")
        else:       # the tensor with its prune / ao.pruning storage (``_orig``, masks)
            out.extend((member, owner, k, axis) for owner, k in stored_slots(module, key))

    for name in producers:
        take(name, modules[name], "weight", 0)
        take(name, modules[name], "bias", 0)
    for name, _ in consumers:
        take(name, modules[name], "weight", 1)
    for name in norms:
        module = modules[name]
        if isinstance(module, nn.Conv2d):            # depthwise: (C, 1, kh, kw) and bias
            take(name, module, "weight", 0)
            take(name, module, "bias", 0)
            continue
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, key, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                take(name, module, key, 0)
    return out, problems


def _axes(axes: set[int]) -> str:
    return f"along axis {' and '.join(map(str, sorted(axes)))}" if axes else "not at all"


def _fold_problems(modules: Mapping[str, nn.Module], holders: Holders,
                   producers: Iterable[str], consumers: Iterable[tuple[str, int]],
                   norms: Iterable[str], size: int) -> list[str]:
    """Why a hidden dimension of ``size`` features cannot be folded into the model as it
    is: a tensor it would permute is parametrized other than by masks, on the meta device,
    of another size, tied to a slot the fold does not permute the same way (``b.weight =
    a.weight`` with ``a`` a producer and ``b`` a consumer, or an embedding tied to a head),
    or shares memory with another tensor. Empty when it can."""
    touches, problems = _fold_touches(modules, producers, consumers, norms)
    effects: dict[int, dict[tuple[int, str], set[int]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for _, owner, key, axis in touches:
        t = getattr(owner, key)
        name = holders.names.get((id(owner), key), key)
        if t.device.type == "meta":
            problems.append(f"{name!r} is on the meta device (no data)")
        elif t.dim() <= axis or t.shape[axis] != size:
            problems.append(f"{name!r} has shape {tuple(t.shape)}, but the dimension has "
                            f"{size} features along its axis {axis}")
        tensors[id(t)] = t
        effects.setdefault(id(t), {}).setdefault((id(owner), key), set()).add(axis)
    for tid, got in effects.items():
        t = tensors[tid]
        want = set().union(*got.values())
        for slot in holders.slots.get(tid, []):
            mine = got.get(slot, set())
            if mine != want:
                other = next(s for s, a in got.items() if a != mine)
                a, b = holders.names[slot], holders.names[other]
                problems.append(
                    f"{a!r} and {b!r} are one tensor (tied parameters): this dimension's "
                    f"order would permute it {_axes(mine)} as {a!r} but {_axes(got[other])} "
                    f"as {b!r}")
                break
        for u in holders.overlapping(t):
            problems.append(f"{holders.name(t)!r} shares memory with {holders.name(u)!r}: "
                            "permuting one in place would change the other")
    return list(dict.fromkeys(problems))


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


def _nm_fold_order(dim, patterns: dict[str, regroup.Pattern], modules,
                   opts: RegroupOptions) -> np.ndarray | None:
    """One input-channel order for the N:M layers reading hidden dimension ``dim``: the
    N:M search on its planned consumers stacked (each scaled to total 1, as
    :func:`_joint_pattern` does), so that after the fold every consumer's mask is N:M in
    plain order. None when no consumer is planned (the producers' rows do not matter to
    N:M). A planned consumer whose input feature spans several columns (a k x k
    convolution: its flattened groups run across kernel positions, and a channel order
    moves k*k columns at once) leaves the dimension unfolded, with the reason."""
    planned = [c for c in dim.consumers if c + ".weight" in patterns]
    wide = [c for c in planned if _kk(modules[c]) != 1]
    if wide:
        ks = "x".join(map(str, modules[wide[0]].kernel_size))
        dim.reasons.append(f"N:M groups of {ks} convolution {wide[0]!r} run along its "
                           "flattened (channel, kernel position) columns, which a channel "
                           "order moves together: not folded")
        return None
    if not planned:
        return None
    parts = []
    for c in planned:
        A = objective_matrix(patterns[c + ".weight"], opts)[0].toarray()
        parts.append(A / (A.sum() or 1.0))
    return run_nm_method(opts.method, np.vstack(parts), opts.nm, seed=opts.seed,
                         time_limit=opts.time_limit).col_perm.astype(np.intp)


def check_mode(mode: Any, example_inputs: Any, caller: str) -> None:
    """Refuse a ``mode`` not in :data:`MODES`, and "fold" without ``example_inputs``
    (errors name ``caller``)."""
    check_choice(mode, "mode", caller, MODES)
    if mode == "fold" and example_inputs is None:
        raise RegroupError(f"{caller}(mode='fold') traces the model to find where "
                           "permutations fold: pass example_inputs=(x,), or use "
                           "mode='runtime'")


def regroup_model(model: nn.Module, *, options: RegroupOptions | None = None,
                  mode: str = "fold", example_inputs: Any = None,
                  calibration: Any = None,
                  rewind: Mapping[str, torch.Tensor] | None = None, permute: bool = True,
                  **kwargs: Any) -> Plan:
    """Regroup every pruned Linear / Conv2d weight and MultiheadAttention
    ``in_proj_weight`` of ``model`` (see :func:`layer_masks`) and apply the result in
    place.

    Layers that cannot be regrouped go to ``plan.skipped`` with the reason: grouped and
    depthwise convolutions (no block kernel runs them), weights a mask cannot cover
    (parametrized other than by torch.ao.pruning's masks, as by ``weight_norm``; left
    untouched), and whatever :func:`regroup.io.layer_pattern` refuses (empty, dense,
    smaller than the block, ...). Layers whose weight a parent module (or the forward
    itself) reads directly are regrouped and masked but go to ``plan.dense``
    (:func:`to_block_sparse` leaves them dense modules).

    In fold mode, a hidden dimension is left unfolded (its sides use runtime
    permutations, ``plan.sides`` says why) when a tensor it would permute is tied to one
    it would not permute the same way (``b.weight = a.weight``, a head tied to an
    embedding), shares memory with another tensor, or is computed by a parametrization
    or hook (``weight_norm``). Producers sharing one weight share one order: the tensor
    is permuted once.

    Parameters
    ----------
    model : nn.Module
        Pruned with torch.nn.utils.prune, torch.ao.pruning, or by zeroing weights.
        Modified in place (masks refilled, permutations folded); deep-copy it first to
        keep the original.
    options : RegroupOptions, optional
        How layers are regrouped (block, format, method, budget, seed, ...; with
        ``format="nm"`` N:M, see the module docstring: dense layers are taken, layers
        whose column count M does not divide are skipped, and a dimension read by a
        k x k convolution is not folded). ``layers``
        are globs over weight names (``"encoder.*"``, ``"fc1.weight"``; default: every
        pruned layer); ``budget_scope="global"`` spends one budget over all selected
        layers (``layer_min`` reserves a share of each layer's own), the folded orders
        staying fixed.
    mode : {"fold", "runtime"}, default="fold"
        See the module docstring. "fold" needs ``example_inputs`` to trace the model.
    example_inputs : tensor or tuple of tensors
        Inputs to trace the model with (shapes only; a batch of 1-2 is enough). Needed
        in fold mode, and with ``chain`` (:class:`regroup.RegroupOptions`: each layer
        planned again by which of its features the neighbouring layers' kept blocks
        use; recommended for very sparse models, see ``benchmarks/README.md``).
    calibration : iterable of batches, or mapping of weight name to tensor, optional
        Rank blocks by ``|w_ij| * ||x_j||`` (the L2 norm of input feature ``j`` on these
        batches, as Wanda does; :func:`~regroup.adapters.torch.input_scales`, or its
        result) instead of ``|w_ij|``. Recommended for models: it recovered clearly better
        on MiniLM (``benchmarks/README.md``). Each layer's norms are divided by their mean,
        so a global budget still compares layers in units of |w|; a layer the calibration
        did not observe (``MultiheadAttention.out_proj``) is ranked by |w| (said in
        ``plan.notes``). ``retained_magnitude`` in the metrics is then in these units.
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
        a model already folded (see :meth:`Plan.fold`), a tensor on the meta device
        (named). The model is changed only once the whole plan is made, all or nothing
        (:meth:`Plan.apply`); every submodule's training flag is kept.
    ValueError, TypeError
        Invalid options or mode (before anything is changed).
    """
    caller = "regroup_model"
    opts = resolve_options(options, caller, **kwargs)
    nm = opts.format == "nm"
    check_mode(mode, example_inputs, caller)
    if opts.chain == "auto":
        on = example_inputs is not None and opts.budget_scope == "layer"
        opts = opts.replace(caller, chain=CHAIN_AUTO if on else None)
    if isinstance(opts.chain, float):
        if opts.budget_scope != "layer":
            raise ValueError(f"The 'chain' parameter of {caller} must be None or 'auto' "
                             "with budget_scope='global' (the allotment would re-rank its "
                             f"blocks by their own mass). Got {opts.chain!r} instead.")
        if example_inputs is None:
            raise RegroupError(f"{caller}(chain=...) traces the model to find which layers "
                               "read which features: pass example_inputs=(x,)")
    _refuse_folded(model, caller)
    refuse_meta(model, caller)
    where = type(model).__name__
    modules = dict(model.named_modules())
    found = _layer_modules(model)
    selected = opts.select(list(found), where=where)
    scales, notes = _calibration_scales(model, calibration, selected, caller)
    patterns: dict[str, regroup.Pattern] = {}
    skipped: dict[str, str] = {}
    for name in selected:
        pattern, why = None, _not_regroupable(modules, name)
        if why is None:
            w, mask, _ = read_mask(*found[name])
            w = w.cpu().double()
            if name in scales:
                w2 = w.reshape(w.shape[0], -1)
                if any(d not in (1, n) for d, n in zip(scales[name].shape, w2.shape,
                                                       strict=True)):
                    raise RegroupError(f"{caller}: the calibration scales of {name!r} have "
                                       f"shape {tuple(scales[name].shape)}, which does not "
                                       f"broadcast to its weight {tuple(w2.shape)}")
                w = (w2 * scales[name]).reshape(w.shape)
            # layer_pattern says why a tensor is not usable (empty, dense, too small, ...).
            pattern, why = layer_pattern(name, w.numpy(), mask.cpu().numpy(),
                                         source=where, block=opts.block,
                                         dense_above=opts.dense_above,
                                         nm=opts.nm if nm else None)
        if pattern is None:
            skipped[name] = why
        else:
            patterns[name] = pattern
    if not patterns:
        raise RegroupError(f"{where} has no pruned Linear or Conv2d layer to regroup "
                           f"(skipped: {skipped or 'none found'})")
    analysis: DimAnalysis | None = None
    if mode == "fold":
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        with training_flags(model):
            model.eval()      # tracing runs the model: keep BatchNorm statistics untouched
            analysis = hidden_dims(model, inputs)
        if not analysis.traced:
            traced = sorted(k for k, v in analysis.parts.items() if v == "traced")
            msg = (f"torch.fx could not trace {where} as a whole ({analysis.error}); folding "
                   f"only inside the {len(traced)} submodules traced on their own "
                   "(plan.sides says why each other side uses runtime permutations)")
            warnings.warn(f"regroup_model: {msg}", RuntimeWarning, stacklevel=2)
            notes.append(msg)
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
        holders = Holders(model)
        for dim in analysis.dims:
            if dim.foldable:
                # What the trace cannot see: tied or parametrized tensors (the reasons
                # then say why these sides use runtime permutations).
                dim.reasons.extend(_fold_problems(
                    modules, holders, dim.producers,
                    [(c, _kk(modules[c])) for c in dim.consumers], dim.norms, dim.size))
            if not dim.foldable:
                continue
            if nm:
                pi = _nm_fold_order(dim, patterns, modules, opts)
                if pi is not None:
                    folds.append(Fold(pi, list(dim.producers),
                                      [(c, _kk(modules[c])) for c in dim.consumers],
                                      list(dim.norms)))
                    fixed_cols.update({c: pi for c in dim.consumers})
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
        mod = name.rpartition(".")[0]
        if nm:
            cp = fixed_cols.get(mod)
            results[name] = regroup.regroup_pattern(pattern, options=opts.per_layer(),
                                                    col_perm=cp)
            sides[name] = {"cols": "fold"} if cp is not None else {
                "cols": "runtime", "why_cols": _why(mode, analysis, dim_of_side.get(
                    (mod, "cols")), name, modules)}
            continue
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
                side["why_" + s] = _why(mode, analysis, dim_of_side.get((mod, s)), name,
                                        modules)
        sides[name] = side
    if folds and opts.refines and not nm:
        note = _refine_folds(folds, patterns, results, modules, opts)
        if note:
            notes.append(note)
    # In runtime mode the trace serves the chain only: what it says about layers that
    # are not called as modules is used when the whole model traced (fold mode reads it
    # part by part and says so above).
    trusted = analysis is not None
    if isinstance(opts.chain, float):
        if analysis is None:
            inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            with training_flags(model):
                model.eval()
                analysis = hidden_dims(model, inputs)
            trusted = analysis.traced
            if not trusted:
                notes.append(f"chain: torch.fx could not trace {where} as a whole "
                             f"({analysis.error}); dead features are found inside the parts "
                             "traced on their own only")
        notes.append(_chain_reselect(patterns, results, sides, analysis, modules, opts))
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
    dense = kept_dense(modules, results, {n for n, r in results.items() if r.format == "nm"})
    if trusted:
        for m, why in analysis.uncalled.items():
            if f"{m}.weight" not in results:
                continue
            # torch.fx keeps torch.nn modules as leaves: a layer inside a known one is not
            # called in the graph, which says nothing (kept_dense knows how they use
            # their children; its sides say why they are not folded).
            if not _in_known_parent(modules, m):
                dense.setdefault(f"{m}.weight", why)
                notes.append(f"{m}: {why}; its mask is applied, it stays dense")
        for m, why in analysis.direct.items():
            # A block-sparse module has no weight for the forward to read.
            if f"{m}.weight" in results and f"{m}.weight" not in dense:
                dense[f"{m}.weight"] = why
                notes.append(f"{m}: {why}; its mask is applied, it stays dense")
    plan = Plan(results, folds, sides, skipped, notes, opts, dense, mode)
    plan.apply(model, rewind=rewind, permute=permute)
    return plan


def _passes_dead(modules: Mapping[str, nn.Module], dim) -> bool:
    """Whether a feature of ``dim`` whose producers keep no weight is constant (and one
    its consumers keep no weight for is unread): the dimension is traced without
    reservation and its channel-wise modules are BatchNorm or depthwise convolutions
    (a LayerNorm mixes the features)."""
    if dim.reasons or not dim.producers or not dim.consumers:
        return False
    for n in dim.norms:
        m = modules[n]
        if not (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
                or (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels)):
            return False
    return True


def _live_sides(name: str, results: Mapping[str, LayerResult], analysis: DimAnalysis,
                modules: Mapping[str, nn.Module]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rows read by a consumer's kept blocks, columns produced by a producer's kept
    blocks) of layer ``name`` as bool arrays, None where unknown (everything live)."""
    mod = name.rpartition(".")[0]
    if not name.endswith(".weight") or mod not in analysis.layer_dims:
        return None, None
    i, o = analysis.layer_dims[mod]
    rows = cols = None
    d = analysis.dims[o]
    if _passes_dead(modules, d) and all(c + ".weight" in results for c in d.consumers):
        rows = np.zeros(d.size, bool)
        for c in d.consumers:
            m = results[c + ".weight"].mask2d
            rows |= m.reshape(m.shape[0], d.size, -1).any(axis=(0, 2))
    d = analysis.dims[i]
    if _passes_dead(modules, d) and all(p + ".weight" in results for p in d.producers):
        live = np.zeros(d.size, bool)
        for p in d.producers:
            live |= results[p + ".weight"].mask2d.any(axis=1)
        cols = np.repeat(live, _kk(modules[mod]))
    return rows, cols


#: Passes of :func:`_chain_reselect` over the layers.
CHAIN_ROUNDS = 2


def _chain_reselect(patterns: Mapping[str, regroup.Pattern], results: dict[str, LayerResult],
                    sides: Mapping[str, Mapping[str, str]], analysis: DimAnalysis,
                    modules: Mapping[str, nn.Module], opts: RegroupOptions) -> str:
    """Plan each layer again (``options.chain``), in place: the magnitudes of its weights
    on dead features (output rows no consumer's kept blocks read, input columns no
    producer's kept blocks write) times ``opts.chain``, the others as they are; sparsest
    layers first (the few blocks of a very sparse layer decide which features survive),
    :data:`CHAIN_ROUNDS` passes, a layer re-planned only when its live features changed.
    A re-plan is a warm start from the layer's current plan (:func:`regroup.regroup_pattern`
    with ``init``: no partitioner runs; refined and annealed as the options say, so with
    ``refine=False`` only its blocks are re-picked); folded sides keep their orders.
    Returns the plan note."""
    eps = opts.chain
    order = sorted(results, key=lambda n: (patterns[n].density, n))
    seen: dict[str, bytes] = {}
    planned: set[str] = set()
    for _ in range(CHAIN_ROUNDS):
        for name in order:
            rows, cols = _live_sides(name, results, analysis, modules)
            if rows is None and cols is None:
                continue
            key = b"".join(b"-" if x is None else np.packbits(x).tobytes() for x in (rows, cols))
            if seen.get(name, b"") == key:
                continue          # the same live features as when last planned
            seen[name] = key
            pat = patterns[name]
            csr = pat.matrix
            f = np.ones(csr.nnz)
            if rows is not None:
                f *= np.where(rows[np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))],
                              1.0, eps)
            if cols is not None:
                f *= np.where(cols[csr.indices], 1.0, eps)
            if name not in planned and np.all(f == 1.0):
                continue          # nothing dead: the first plan stands
            m = csr.copy()
            m.data = m.data * f
            weighted = regroup.Pattern(pat.name, m, pat.shape, pat.has_weights)
            r = results[name]
            rp = r.row_perm if sides[name]["rows"] == "fold" else None
            cp = r.col_perm if sides[name]["cols"] == "fold" else None
            # A warm start from the layer's plan (its orders, blocks re-picked for the
            # scaled weights, then refined) in place of the partitioners: 2.5x less plan
            # time on MobileNetV2 for the same recovery (benchmarks/README.md).
            layer_opts = opts.per_layer() if rp is None else opts.per_layer().replace(
                "regroup_model", anneal=None)
            new = regroup.regroup_pattern(weighted, options=layer_opts, init=r,
                                          row_perm=rp, col_perm=cp)
            metrics = dict(new.metrics, chain=eps)
            if pat.has_weights:      # in the layer's own units, not the weighted ones
                metrics["retained_magnitude"] = retained(pat.matrix,
                                                         new.mask.reshape(csr.shape))
            results[name] = replace(new, metrics=metrics)
            planned.add(name)
    return (f"chain {eps:g}: {len(planned)} of {len(results)} layers planned again with "
            "the weights of dead features scaled down")


def _calibration_scales(model: nn.Module, calibration: Any, names: list[str], caller: str
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per selected weight, its input norms over their mean (``{}`` without calibration),
    and the plan notes that say so."""
    if calibration is None:
        return {}, []
    if isinstance(calibration, Mapping):
        raw = check_scales(calibration, caller)
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"The 'calibration' parameter of {caller} must be an iterable of "
                        "batches or a mapping of weight name to input norms (input_scales). "
                        f"Got {type(calibration).__name__} instead.")
    else:
        measurable = set(input_scales_targets(model))
        raw = input_scales(model, calibration, [n for n in names if n in measurable])
    scales, unseen = {}, []
    for name in names:
        t = raw.get(name)
        if t is None:
            unseen.append(name)
            continue
        mean = float(t.mean())
        if mean <= 0:
            unseen.append(name)          # an input that is always zero says nothing
            continue
        scales[name] = t / mean
    notes = [f"calibration: blocks ranked by |w| x input norm on {len(scales)} layers"]
    if unseen:
        notes.append(f"calibration did not observe {len(unseen)} layers (ranked by |w|): "
                     f"{unseen[:5]}{' ...' if len(unseen) > 5 else ''}")
    return scales, notes


def _refine_folds(folds: list[Fold], patterns: Mapping[str, regroup.Pattern],
                  results: dict[str, LayerResult], modules: Mapping[str, nn.Module],
                  opts: RegroupOptions) -> str | None:
    """Refine the folded orders jointly over the layers sharing them
    (:func:`regroup.refine.refine_shared`), in place: each fold's order was chosen once on
    its joint pattern, before any layer's blocks; a layer folded on both sides had no
    side of its own left to fit. Returns a note with the gain, or None."""
    where: dict[tuple[str, str], int] = {}
    frozen = set()
    for d, f in enumerate(folds):
        for p in f.producers:
            where[(p, "rows")] = d
        for c, kk in f.consumers:
            where[(c, "cols")] = d
            if kk != 1:
                frozen.add(d)      # a feature is kk columns there: not an assignment step
    names = [n for n in results if (n.rpartition(".")[0], "rows") in where
             or (n.rpartition(".")[0], "cols") in where]
    if opts.format == "grid" and opts.block[0] != opts.block[1]:
        # Producers group a fold's features by block rows, consumers by block columns:
        # one assignment cannot serve both sizes.
        axes: dict[int, set[str]] = {}
        for n in names:
            for side in ("rows", "cols"):
                d = where.get((n.rpartition(".")[0], side))
                if d is not None:
                    axes.setdefault(d, set()).add(side)
        frozen |= {d for d, sides in axes.items() if len(sides) == 2}
    if not names or len(frozen) == len(folds):
        return None
    layers, rows, cols = [], [], []
    for n in names:
        r, pat, mod = results[n], patterns[n], n.rpartition(".")[0]
        V = pat.matrix if r.metrics["objective"] == "magnitude" else pat.binary()
        lay = build_layout(V, r.row_perm, r.col_perm, r.block_shape, r.format, opts.budget,
                           pat.nnz)
        layers.append((V, lay, opts.budget, pat.nnz))
        rk = where.get((mod, "rows"))
        ck = where.get((mod, "cols")) if r.format == "grid" else None
        # A side in a frozen fold is fixed but not searched: its own frozen key.
        rows.append(("frozen", n, "rows") if rk in frozen else rk)
        cols.append(("frozen", n, "cols") if ck in frozen else ck)
    frozen = frozen | {k for k in rows + cols if isinstance(k, tuple)}
    objectives = {results[n].metrics["objective"] for n in names}
    before = [lay.kept_mass / (float(V.sum()) or 1.0) for V, lay, _, _ in layers]
    bounds: list[str] = []
    new = refine_shared(layers, rows, cols, frozen=frozen, time_limit=opts.time_limit,
                        notes=bounds)
    if bounds:       # a bound that stopped the joint search is said, as refine's are
        for n in names:
            r = results[n]
            results[n] = replace(r, metrics={**r.metrics,
                                             "bounds": [*r.metrics.get("bounds", ()), *bounds]})
    after = [lay.kept_mass / (float(V.sum()) or 1.0) for (V, _, _, _), lay in zip(layers, new)]
    if sum(after) <= sum(before):
        return None
    for d, f in enumerate(folds):
        i = next((i for i, (rk, ck) in enumerate(zip(rows, cols)) if d in (rk, ck)), None)
        if i is not None and d not in frozen:
            f.perm = new[i].row_perm if rows[i] == d else new[i].col_perm
    for n, (V, base, _, _), lay in zip(names, layers, new):
        r, pat = results[n], patterns[n]
        n_rows, n_cols = lay.shape
        identity = build_layout(V, np.arange(n_rows), np.arange(n_cols), r.block_shape,
                                r.format, opts.budget, pat.nnz)
        # "shared_gain": what the joint refinement changed in this layer's objective
        # (a layer may lose for the sum); the other metrics are this layout's.
        gain = (lay.kept_mass - base.kept_mass) / (float(V.sum()) or 1.0)
        results[n] = replace(r, mask=pat.unflatten(layout_mask(lay)), row_perm=lay.row_perm,
                             col_perm=lay.col_perm, panel_cols=lay.panel_cols,
                             metrics={**r.metrics, **layer_metrics(pat, lay, identity),
                                      "shared_gain": gain})
    return (f"folded orders refined jointly over the {len(names)} layers sharing them: "
            f"mean retained {'/'.join(sorted(objectives))} {np.mean(before):.4f} -> "
            f"{np.mean(after):.4f}")


def _why(mode: str, analysis: DimAnalysis | None, dim, name: str,
         modules: Mapping[str, nn.Module]) -> str:
    if mode == "runtime":
        return "mode='runtime'"
    mod, _, attr = name.rpartition(".")
    if attr == "in_proj_weight":
        return ("MultiheadAttention.in_proj_weight: its rows are split into q, k, v heads "
                "inside the attention module")
    if analysis is not None and mod in analysis.uncalled:
        if _in_known_parent(modules, mod):
            parent = mod.rpartition(".")[0]
            return (f"inside {type(modules[parent]).__name__} {parent!r}, which torch.fx "
                    "does not trace into")
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
    """Replace the planned modules of a regrouped ``model`` (after :func:`regroup_model` or
    :meth:`Plan.apply`) by block-sparse modules, in place.

    A planned Linear / Conv2d becomes a :class:`BlockSparseLinear` /
    :class:`BlockSparseConv2d`; an ``nn.MultiheadAttention`` whose ``in_proj_weight``
    and/or ``out_proj.weight`` is planned becomes a
    :class:`BlockSparseMultiheadAttention` (the unplanned projection stays dense inside
    it). An N:M layer (format "nm") that is a Linear becomes an
    :class:`~regroup.adapters.torch.NMLinear` (torch's 2:4 kernel on CUDA where it runs,
    the masked dense product elsewhere; ``backend`` is then one of "auto",
    "semi_structured", "dense"); N:M convolutions and N:M projections inside a
    MultiheadAttention stay dense-masked. The model's fold marker (see :meth:`Plan.fold`)
    must be this plan's: a folding plan needs the model folded by it, a runtime plan an
    unfolded model.

    Returns ``{layer name: what happened}``: the new module's class name, or
    ``"stays dense-masked: <why>"`` (a parent reads the weight directly, see
    :attr:`Plan.dense`; a grouped or string-padded convolution; an unsupported
    MultiheadAttention). A ``nn.TransformerEncoder`` holding block-sparse modules gets
    ``use_nested_tensor = False`` (its nested-tensor path hands NestedTensors to every
    layer and reads the first layer's weights as tensors); that is reported under
    ``"<encoder>.use_nested_tensor"``.

    Raises
    ------
    RegroupError
        The fold marker does not match, a planned layer is not in the model, or a tensor
        is on the meta device. Nothing is changed then, nor when building a later
        module fails: every block-sparse module is built before the first is swapped in.
    ValueError
        ``backend`` is not one of the plan's layers' paths.
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
    refuse_meta(model, "to_block_sparse")
    nm = {name for name, r in plan.layers.items() if r.format == "nm"}
    for layers, allowed, kind in ((nm, NM_BACKENDS, "N:M"),
                                  (set(plan.layers) - nm, BACKENDS, "block")):
        if layers and backend not in allowed:
            raise ValueError(f"The 'backend' parameter of to_block_sparse must be one of "
                             f"{allowed} for a plan with {kind} layers. Got {backend!r} "
                             "instead.")
    modules = dict(model.named_modules())
    sparse_types = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention,
                    NMLinear)
    for name in plan.layers:                    # a plan of another model: change nothing
        done = modules.get(name.rpartition(".")[0])
        if isinstance(done, sparse_types):
            raise RegroupError(f"to_block_sparse: layer {name!r} is already a "
                               f"{type(done).__name__}")
        _layer_tensor(modules, name)
    # What the model's structure forbids now, and what the planning saw (a trace).
    dense = {**plan.dense, **kept_dense(modules, plan.layers, nm)}
    out: dict[str, str] = {}
    # Every new module is built before the first is swapped in: a failure on a later
    # layer leaves the model as it was.
    swaps: list[tuple[str, nn.Module]] = []
    # Attention first: its out_proj is converted inside BlockSparseMultiheadAttention.
    for mod_name, module in modules.items():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        names = {k: w for k, w in (("in_proj", _join(mod_name, "in_proj_weight")),
                                   ("out_proj", _join(mod_name, "out_proj.weight")))
                 if w in plan.layers}
        for w in names.values():
            if w in dense:
                out[w] = f"stays dense-masked: {dense[w]}"
        layouts = {k: plan.current_result(w) for k, w in names.items() if w not in dense}
        if layouts:
            swaps.append((mod_name, on_device_of(module, BlockSparseMultiheadAttention(
                module, **layouts, backend=backend))))
            out.update({names[k]: "BlockSparseMultiheadAttention" for k in layouts})
    for name in plan.layers:
        if name in out:
            continue
        mod_name = name.rpartition(".")[0]
        module = modules[mod_name]
        if name in dense:
            out[name] = f"stays dense-masked: {dense[name]}"
            continue
        if not mod_name:
            out[name] = ("stays dense-masked: the model itself is the layer (to_block_sparse "
                         "replaces submodules: wrap it, e.g. nn.Sequential(layer))")
            continue
        if name in nm:
            if not isinstance(module, nn.Linear):
                out[name] = ("stays dense-masked: torch's N:M (2:4) kernels multiply "
                             "matrices (to_sparse_semi_structured); an N:M convolution runs "
                             "as its masked dense weight")
                continue
            new_nm = NMLinear(plan.current_result(name), module.weight.detach(), module.bias,
                              backend=backend)
            swaps.append((mod_name, on_device_of(module, new_nm)))
            out[name] = "NMLinear"
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(
                module.padding, str) or module.padding_mode != "zeros"):
            out[name] = ("stays dense-masked: BlockSparseConv2d needs groups=1, numeric "
                         "padding and zero padding mode")
            continue
        r = plan.current_result(name)
        if isinstance(module, nn.Linear):
            new: nn.Module = BlockSparseLinear(r, module.weight.detach(), module.bias,
                                               backend=backend)
        else:
            new = BlockSparseConv2d(r, module, backend=backend)
        swaps.append((mod_name, on_device_of(module, new)))
        out[name] = type(new).__name__
    for mod_name, new in swaps:
        parent, _, leaf = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    out.update(disable_nested_tensor(model))
    return out


def disable_nested_tensor(model: nn.Module) -> dict[str, str]:
    """Set ``use_nested_tensor = False`` on every ``nn.TransformerEncoder`` of ``model``
    that holds block-sparse modules; ``{"<encoder>.use_nested_tensor": why}`` for each."""
    sparse_types = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention)
    out = {}
    for enc_name, enc in model.named_modules():
        if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False) \
                and any(isinstance(m, sparse_types) for m in enc.modules()):
            enc.use_nested_tensor = False
            out[_join(enc_name, "use_nested_tensor")] = (
                "set to False: the nested-tensor path reads the first layer's weights as "
                "tensors and hands NestedTensors to every layer, which block-sparse modules "
                "do not take (TransformerEncoder's constructor makes the same choice for a "
                "self_attn with _qkv_same_embed_dim=False)")
    return out


def on_device_of(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device (index buffers are built on the CPU)."""
    ref = next(old.parameters(), None)
    return new.to(ref.device) if ref is not None else new
