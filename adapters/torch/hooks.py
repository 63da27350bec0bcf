"""regroup inside existing pruning pipelines.

- :func:`regroup_unstructured` / :class:`RegroupBlocks`: a torch.nn.utils.prune method,
  used like ``prune.l1_unstructured``: optionally magnitude-prune ``amount`` of the
  surviving weights, then regroup the mask into refilled blocks.
- :class:`RegroupSparsifier`: a torch.ao.pruning sparsifier whose ``step()`` does the same
  for every configured tensor.
- :func:`imp_regroup`: the IMP-Regroup loop (train -> prune -> regroup -> rewind, repeated,
  then a final training), with callbacks.

In all three the layouts (:class:`regroup.LayerResult`, original coordinates) are kept:
``RegroupBlocks.result``, ``RegroupSparsifier.results[fqn]``, and the plans returned by the
loop. Each takes ``options=regroup.RegroupOptions(...)`` and keyword arguments naming its
fields, validated once when it is called or constructed; masks are written by
:func:`~regroup.adapters.torch.masking.write_mask`.

With ``format="nm"`` the two per-tensor hooks prune to N:M after a searched column
permutation (dense tensors too, as ASP does): the mask in original coordinates is what the
layer computes with, and its layout (``col_perm``) runs on torch's 2:4 kernel through
``to_block_sparse(model, Plan.from_result({name: layout}))`` (an input gather), or
without a gather when :func:`~regroup.adapters.torch.regroup_model` folds the orders.
"""
from __future__ import annotations

import copy
import glob
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.nn.utils import prune

import regroup
from regroup import RegroupError
from regroup.options import RegroupOptions, resolve_options
from regroup.result import LayerResult
from regroup.validation import check_choice, check_int, check_real

from ._journal import atomic
from .masking import journaled_write_mask, read_mask, write_mask
from .plan import Plan, check_mode, layer_masks, regroup_model

__all__ = ["RegroupBlocks", "regroup_unstructured", "block_layout", "RegroupSparsifier",
           "imp_regroup", "magnitude_mask"]


def magnitude_mask(values: torch.Tensor, mask: torch.Tensor, amount: float) -> torch.Tensor:
    """``mask`` with the ``amount`` fraction of its surviving entries of smallest
    ``|values|`` removed (ties: lower flat index pruned first), as l1_unstructured does."""
    check_real(amount, "amount", "magnitude_mask", 0, 1, high_open=True)
    keep = mask.bool().reshape(-1)
    alive = torch.nonzero(keep).reshape(-1)
    k = int(round(amount * alive.numel()))
    out = keep.clone()
    if k:
        score = values.detach().abs().reshape(-1)[alive].double().cpu().numpy()
        order = np.lexsort((alive.cpu().numpy(), score))[:k]
        out[alive[torch.from_numpy(order).to(alive.device)]] = False
    return out.reshape(mask.shape)


# Why the IMP loop refuses format="nm": its rounds prune to a rising sparsity, while N:M
# keeps a fixed N/M of every group.
NM_NOT_IMP = ("IMP prunes to a rising sparsity over its rounds and N:M keeps a fixed N of "
              "every M; regroup the trained model with regroup_model(format='nm'), or prune "
              "per tensor with RegroupBlocks / RegroupSparsifier(format='nm')")


def _per_tensor(opts: RegroupOptions, caller: str, *, layers: bool = False) -> None:
    """Refuse the model-level options a per-tensor entry point cannot honour."""
    opts.refuse_chain(caller)
    if opts.budget_scope != "layer":
        raise ValueError(f"The 'budget_scope' parameter of {caller} must be 'layer': it "
                         f"regroups one tensor at a time (regroup_model and imp_regroup "
                         f"spend a model-wide budget). Got {opts.budget_scope!r} instead.")
    if opts.layers is not None and not layers:
        raise ValueError(f"The 'layers' parameter of {caller} must be None: it regroups the "
                         f"tensor it is given. Got {list(opts.layers)!r} instead.")


def _layout(values: torch.Tensor, mask: torch.Tensor, name: str, opts: RegroupOptions
            ) -> LayerResult:
    pattern = regroup.from_array(values.detach().cpu().double().numpy(), name=name,
                                 mask=mask.detach().cpu().numpy())
    return regroup.regroup_pattern(pattern, options=opts.per_layer())


class RegroupBlocks(prune.BasePruningMethod):
    """torch.nn.utils.prune method: magnitude-prune ``amount`` of the surviving weights
    (skipped when None), then keep the best blocks of a regrouped layout, refilled.

    ``options`` (a :class:`regroup.RegroupOptions`) and keyword arguments naming its
    fields set how the tensor is regrouped; validated here (``budget_scope`` must be
    "layer" and ``layers`` None: one tensor is regrouped).

    ``PRUNING_TYPE`` is "global" so that, inside a PruningContainer, the new mask may
    re-enable previously pruned positions (the refill); every other pruning method can
    only remove weights. After :meth:`apply`, ``result`` holds the layout.
    """

    PRUNING_TYPE = "global"

    def __init__(self, amount: float | None = None, *, layer: str = "weight",
                 options: RegroupOptions | None = None, **kwargs: Any) -> None:
        caller = "RegroupBlocks"
        self.options = resolve_options(options, caller, **kwargs)
        _per_tensor(self.options, caller)
        self.amount = check_real(amount, "amount", caller, 0, 1, high_open=True, optional=True)
        self.layer = layer
        self.result: LayerResult | None = None

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.bool()
        if self.amount:
            mask = magnitude_mask(t, mask, self.amount)
        self.result = _layout(t * mask, mask, self.layer, self.options)
        return torch.from_numpy(self.result.mask).to(device=t.device, dtype=default_mask.dtype)


def regroup_unstructured(module: nn.Module, name: str = "weight",
                         amount: float | None = None, *,
                         importance_scores: torch.Tensor | None = None,
                         options: RegroupOptions | None = None, **kwargs: Any) -> nn.Module:
    """Prune ``module.<name>`` to refilled regrouped blocks, like ``prune.l1_unstructured``.

    Magnitude-prunes ``amount`` (a fraction in [0, 1)) of the weights still alive, then
    regroups the mask and keeps the chosen blocks. Refilled positions take the unpruned
    values (``weight_orig``). The layout is at
    ``regroup.adapters.torch.block_layout(module, name)``.

    ``options`` and ``**kwargs`` (fields of :class:`regroup.RegroupOptions`: block,
    method, format, budget, seed, objective, ...) say how, as in
    :func:`regroup.regroup_pattern`; ``budget_scope`` must be "layer" and ``layers``
    None (one tensor).
    """
    caller = "regroup_unstructured"
    opts = resolve_options(options, caller, **kwargs)
    _per_tensor(opts, caller)
    check_real(amount, "amount", caller, 0, 1, high_open=True, optional=True)
    RegroupBlocks.apply(module, name, amount, layer=f"{type(module).__name__}.{name}",
                        options=opts, importance_scores=importance_scores)
    return module


def block_layout(module: nn.Module, name: str = "weight") -> LayerResult:
    """The layout of the latest :class:`RegroupBlocks` applied to ``module.<name>``."""
    for hook in module._forward_pre_hooks.values():
        methods = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else (hook,)
        if getattr(hook, "_tensor_name", None) != name:
            continue
        for m in reversed(list(methods)):
            if isinstance(m, RegroupBlocks) and m.result is not None:
                return m.result
    raise RegroupError(f"{type(module).__name__}.{name} was not pruned with "
                       "regroup_unstructured")


class RegroupSparsifier(BaseSparsifier):
    """torch.ao.pruning sparsifier: each ``step()`` magnitude-prunes ``sparsity_level`` of
    each tensor (None: keep its current mask) and regroups the mask into refilled blocks.

    ``options`` and ``**kwargs`` (fields of :class:`regroup.RegroupOptions`) are the
    defaults of every tensor; a config entry of :meth:`prepare` may override
    ``sparsity_level`` and any field but ``layers`` by name (``{"tensor_fqn":
    "fc2.weight", "format": "shuffled"}``), validated by :meth:`prepare`. ``layers``
    (globs over weight names) selects among the configured tensors. ``budget_scope`` must
    be "layer". ``results[fqn]`` holds each tensor's layout.

    >>> sparsifier = RegroupSparsifier(sparsity_level=0.9, block=16)
    >>> sparsifier.prepare(model, config=[{"tensor_fqn": "fc1.weight"}])
    >>> sparsifier.step()
    """

    # Config keys that are not options: torch.ao.pruning's own, and the sparsity level.
    _KEYS = frozenset({"tensor_fqn", "module", "module_fqn", "tensor_name", "parametrization",
                       "mask", "sparsity_level"})

    def __init__(self, sparsity_level: float | None = None, *,
                 options: RegroupOptions | None = None, **kwargs: Any) -> None:
        caller = "RegroupSparsifier"
        opts = resolve_options(options, caller, **kwargs)
        _per_tensor(opts, caller, layers=True)
        level = check_real(sparsity_level, "sparsity_level", caller, 0, 1, high_open=True,
                           optional=True)
        super().__init__(defaults={"sparsity_level": level, "options": opts})
        self.results: dict[str, LayerResult] = {}

    @property
    def options(self) -> RegroupOptions:
        """The default options of every tensor."""
        return self.defaults["options"]

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "results": self.results}

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """As :meth:`BaseSparsifier.prepare`; each config entry's overrides are validated
        (errors name the entry), and ``layers`` filters the entries, before the model is
        touched. ``config=None`` configures every Linear weight."""
        caller = "RegroupSparsifier.prepare"
        if config is None:
            self.make_config_from_model(model)
            config = self.config
        entries = []
        for entry in config:
            fqn = entry.get("tensor_fqn") if isinstance(entry, Mapping) else None
            if not isinstance(fqn, str):
                raise TypeError(f"{caller}: every config entry must be a dict with a "
                                f"'tensor_fqn' (a str), like {{'tensor_fqn': 'fc1.weight'}}. "
                                f"Got {entry!r} instead.")
            where = f"{caller} (config of {fqn!r})"
            overrides = {k: v for k, v in entry.items() if k not in self._KEYS}
            if "options" in overrides or "layers" in overrides:
                raise TypeError(f"{where}: a config entry overrides fields of RegroupOptions "
                                "by name (not 'options'; 'layers' is the sparsifier's)")
            opts = resolve_options(self.options, where, **overrides)
            _per_tensor(opts, where, layers=True)
            if "sparsity_level" in entry:
                check_real(entry["sparsity_level"], "sparsity_level", where, 0, 1, high_open=True,
                           optional=True)
            entries.append({**{k: v for k, v in entry.items() if k in self._KEYS},
                            "options": opts})
        if self.options.layers is not None:
            keep = set(self.options.select([e["tensor_fqn"] for e in entries],
                                           where=type(model).__name__))
            entries = [e for e in entries if e["tensor_fqn"] in keep]
        super().prepare(model, entries)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        fqn = kwargs.get("tensor_fqn", tensor_name)
        opts = kwargs.get("options", self.options)
        values, keep, _ = read_mask(module, tensor_name)
        level = kwargs.get("sparsity_level")
        if level:
            # Relative to the whole tensor, as the ao sparsifiers' sparsity_level is.
            alive = int(keep.sum())
            target_alive = int(round((1 - level) * keep.numel()))
            if target_alive < alive:
                keep = magnitude_mask(values, keep, 1 - target_alive / alive)
        res = _layout(values * keep, keep, fqn, opts)
        self.results[fqn] = res
        write_mask(module, tensor_name, res.mask)


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _load_rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (a state dict of the model, pruned or not) into ``model``: a pruned
    weight gets the values under its mask (:func:`write_mask`, the mask unchanged), every
    other tensor is copied; masks in ``state`` are ignored (they are the round's)."""
    own = model.state_dict()
    modules = dict(model.named_modules())
    masked, pairs, unknown, misshapen = [], [], [], []
    for key, value in state.items():
        if key.endswith("_mask"):
            continue                           # masks are this round's, not the rewind's
        mod_name, _, attr = key.rpartition(".")
        attr = attr.removesuffix("_orig")
        module = modules.get(mod_name)
        if module is not None and isinstance(getattr(module, attr + "_mask", None),
                                             torch.Tensor):
            target = getattr(module, attr + "_orig")
            masked.append((module, attr, value))
        else:
            target = own.get(key)
            pairs.append((target, value))
        if target is None:
            unknown.append(key)
        elif tuple(target.shape) != tuple(value.shape):
            misshapen.append(f"{key} {tuple(value.shape)}, the model's {tuple(target.shape)}")
    # Checked before anything is copied: the model stays as it was.
    if unknown:
        raise RegroupError(f"imp_regroup: the rewind state has tensors the model lacks: "
                           f"{', '.join(unknown[:8])}; pass a state dict of this model")
    if misshapen:
        raise RegroupError(f"imp_regroup: the rewind state has tensors of other shapes: "
                           f"{'; '.join(misshapen[:8])}; pass a state dict of this model")
    with atomic() as journal, torch.no_grad():    # a failure part-way undoes the copies
        for target, value in pairs:
            journal.values(target)
            target.copy_(value)
        for module, attr, value in masked:
            journaled_write_mask(journal, module, attr, getattr(module, attr + "_mask"),
                                 values=value)


def imp_regroup(model: nn.Module, train: Callable[[nn.Module, int], Any], *,
                rounds: int, sparsity: float, scope: str = "global", regroup: bool = True,
                options: RegroupOptions | None = None, mode: str = "runtime",
                example_inputs: Any = None,
                rewind: Mapping[str, torch.Tensor] | str | None = "init",
                evaluate: Callable[[nn.Module], float] | None = None,
                callbacks: Sequence[Callable[[str, dict], None]] = (),
                final_train: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """IMP-Regroup: ``rounds`` x (train -> magnitude prune -> regroup -> rewind), then
    a final training. ``model`` is modified in place (torch.nn.utils.prune masks).

    Parameters
    ----------
    train : callable(model, round)
        Trains the model in place (your loop, optimizer and data).
    rounds : int
        Pruning rounds; each removes the same fraction of the surviving weights so that
        the last reaches ``sparsity`` (before regrouping).
    sparsity : float
        Target fraction of pruned weights in the selected layers.
    scope : {"global", "layer"}
        Magnitude ranking across all selected layers, or within each.
    regroup : bool, default=True
        Regroup the masks after each pruning; False gives plain unstructured IMP (the
        options then only select the layers).
    options : RegroupOptions, optional
        How the masks are regrouped (block, method, format, budget, ...; ``method
        ="identity"`` gives naive blocks without permutation), as in
        :func:`regroup_model`. ``layers`` are globs over weight names selecting the
        layers to prune (``"encoder.*"``, ``"fc1.weight"``); default: every Linear /
        Conv2d but the last (the classifier).
    mode, example_inputs
        As in :func:`regroup_model`. With "fold" the layouts are planned so that their
        permutations fold, but the parameters stay in the original order during the loop
        (rewinding needs it): call ``history[-1]["plan"].fold(model)`` to deploy.
    rewind : "init", a state dict, or None
        Weights to rewind to after each round: the model's state when the loop starts,
        the given state dict, or no rewinding (fine-tuning).
    evaluate : callable(model) -> float, optional
        Called after every training; its value is recorded as ``"score"``.
    callbacks : callables(event, info)
        Called with events "trained", "recorded", "pruned", "regrouped", "rewound" and an
        info dict (model, round, and plan or record).
    final_train : bool, default=True
        Train once more after the last round (and record it).
    **kwargs
        Fields of :class:`regroup.RegroupOptions`, applied on top of ``options``.

    Every argument is checked before the first training.

    Returns
    -------
    list of dict
        One record per training: round (0 is the dense model), sparsity of the selected
        layers' masks, score, and the plan the model was trained under (None for the
        dense round and without regrouping).
    """
    caller = "imp_regroup"
    if "method" in kwargs and kwargs["method"] is None:
        raise TypeError(f"The 'method' parameter of {caller} must be a partitioner name "
                        "(plain IMP without regrouping is regroup=False). Got None instead.")
    opts = resolve_options(options, caller, **kwargs)
    opts.require_blocks(caller, NM_NOT_IMP)
    check_int(rounds, "rounds", caller, low=1)
    check_real(sparsity, "sparsity", caller, 0, 1, low_open=True, high_open=True)
    check_choice(scope, "scope", caller, ("global", "layer"))
    if not isinstance(regroup, bool):
        raise TypeError(f"The 'regroup' parameter of {caller} must be a bool. Got "
                        f"{regroup!r} instead.")
    if regroup:
        check_mode(mode, example_inputs, caller)
    if isinstance(rewind, str) and rewind != "init":
        raise ValueError(f"The 'rewind' parameter of {caller} must be 'init', a state "
                         f"dict or None. Got {rewind!r} instead.")
    modules = dict(_prunable(model))
    if opts.layers is None:
        names = list(modules)[:-1]
        if not names:
            raise RegroupError(f"{caller}: {type(model).__name__} has no Linear/Conv2d "
                               f"besides the last (the classifier, not pruned); have "
                               f"{list(modules)}")
    else:
        weights = opts.select([n + ".weight" for n in modules], where=type(model).__name__)
        names = [w[: -len(".weight")] for w in weights]
    # Each round regroups exactly the pruned weights (their names as literal globs).
    round_opts = opts.replace(caller, layers=[glob.escape(n + ".weight") for n in names])
    state0 = copy.deepcopy(model.state_dict()) if isinstance(rewind, str) else rewind
    per_round = 1 - (1 - sparsity) ** (1 / rounds)
    history: list[dict[str, Any]] = []

    def emit(event: str, **info: Any) -> None:
        for cb in callbacks:
            cb(event, {"model": model, **info})

    def record(r: int, plan: Plan | None) -> None:
        masks = layer_masks(model)
        sel = [masks[n + ".weight"][1] for n in names]
        total = sum(m.numel() for m in sel)
        rec = {"round": r, "sparsity": 1 - sum(int(m.sum()) for m in sel) / total,
               "plan": plan, "score": evaluate(model) if evaluate is not None else None}
        history.append(rec)
        emit("recorded", round=r, record=rec)

    plan: Plan | None = None
    for r in range(rounds):
        train(model, r)
        emit("trained", round=r)
        record(r, plan)
        params = [(modules[n], "weight") for n in names]
        if scope == "global":
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured,
                                      amount=per_round)
        else:
            for m, _ in params:
                prune.l1_unstructured(m, "weight", amount=per_round)
        emit("pruned", round=r)
        if regroup:
            plan = regroup_model(model, options=round_opts, mode=mode,
                                 example_inputs=example_inputs, permute=False)
            emit("regrouped", round=r, plan=plan)
        if state0 is not None:
            _load_rewind(model, state0)
            emit("rewound", round=r)
    if final_train:
        train(model, rounds)
        emit("trained", round=rounds)
        record(rounds, plan)
    return history
