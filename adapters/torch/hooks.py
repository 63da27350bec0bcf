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
loop.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.nn.utils import prune

import regroup
from regroup import RegroupError
from regroup.result import LayerResult

from .plan import Plan, layer_masks, regroup_model

__all__ = ["RegroupBlocks", "regroup_unstructured", "block_layout", "RegroupSparsifier",
           "imp_regroup", "magnitude_mask"]


def magnitude_mask(values: torch.Tensor, mask: torch.Tensor, amount: float) -> torch.Tensor:
    """``mask`` with the ``amount`` fraction of its surviving entries of smallest
    ``|values|`` removed (ties: lower flat index pruned first), as l1_unstructured does."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"The 'amount' parameter must be in [0, 1). Got {amount!r} instead.")
    keep = mask.bool().reshape(-1)
    alive = torch.nonzero(keep).reshape(-1)
    k = int(round(amount * alive.numel()))
    out = keep.clone()
    if k:
        score = values.detach().abs().reshape(-1)[alive].double().cpu().numpy()
        order = np.lexsort((alive.cpu().numpy(), score))[:k]
        out[alive[torch.from_numpy(order).to(alive.device)]] = False
    return out.reshape(mask.shape)


def _layout(values: torch.Tensor, mask: torch.Tensor, name: str, options: Mapping[str, Any]
            ) -> LayerResult:
    pattern = regroup.from_array(values.detach().cpu().double().numpy(), name=name,
                                 mask=mask.detach().cpu().numpy())
    return regroup.regroup_pattern(pattern, **options)


class RegroupBlocks(prune.BasePruningMethod):
    """torch.nn.utils.prune method: magnitude-prune ``amount`` of the surviving weights
    (skipped when None), then keep the best blocks of a regrouped layout, refilled.

    ``PRUNING_TYPE`` is "global" so that, inside a PruningContainer, the new mask may
    re-enable previously pruned positions (the refill); every other pruning method can
    only remove weights. After :meth:`apply`, ``result`` holds the layout.
    """

    PRUNING_TYPE = "global"

    def __init__(self, amount: float | None = None, *, layer: str = "weight",
                 **options: Any) -> None:
        self.amount = amount
        self.layer = layer
        self.options = options
        self.result: LayerResult | None = None

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.bool()
        if self.amount:
            mask = magnitude_mask(t, mask, self.amount)
        self.result = _layout(t * mask, mask, self.layer, self.options)
        return torch.from_numpy(self.result.mask).to(device=t.device, dtype=default_mask.dtype)


def regroup_unstructured(module: nn.Module, name: str = "weight",
                         amount: float | None = None, *, block: Any = 32,
                         method: str = "auto", format: str = "grid", budget: str = "iso",
                         seed: int = 0, objective: str = "auto",
                         importance_scores: torch.Tensor | None = None) -> nn.Module:
    """Prune ``module.<name>`` to refilled regrouped blocks, like ``prune.l1_unstructured``.

    Magnitude-prunes ``amount`` (a fraction) of the weights still alive, then regroups the
    mask (``block``, ``method``, ``format``, ``budget``, ``seed``, ``objective`` as in
    :func:`regroup.regroup_pattern`) and keeps the chosen blocks. Refilled positions take
    the unpruned values (``weight_orig``). The layout is at
    ``regroup.adapters.torch.block_layout(module, name)``.
    """
    RegroupBlocks.apply(module, name, amount, layer=f"{type(module).__name__}.{name}",
                        block=block, method=method, format=format, budget=budget, seed=seed,
                        objective=objective, importance_scores=importance_scores)
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

    Defaults (overridable per config entry): ``block``, ``method``, ``format``,
    ``budget``, ``seed``, ``objective``. ``results[fqn]`` holds each tensor's layout.

    >>> sparsifier = RegroupSparsifier(sparsity_level=0.9, block=16)
    >>> sparsifier.prepare(model, config=[{"tensor_fqn": "fc1.weight"}])
    >>> sparsifier.step()
    """

    _OPTIONS = ("block", "method", "format", "budget", "seed", "objective")

    def __init__(self, sparsity_level: float | None = None, *, block: Any = 32,
                 method: str = "auto", format: str = "grid", budget: str = "iso",
                 seed: int = 0, objective: str = "auto") -> None:
        super().__init__(defaults={"sparsity_level": sparsity_level, "block": block,
                                   "method": method, "format": format, "budget": budget,
                                   "seed": seed, "objective": objective})
        self.results: dict[str, LayerResult] = {}

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        fqn = kwargs.get("tensor_fqn", tensor_name)
        parametrization = getattr(module.parametrizations, tensor_name)
        mask = parametrization[0].mask
        values = parametrization.original
        level = kwargs.get("sparsity_level")
        keep = mask.bool()
        if level:
            # Relative to the whole tensor, as the ao sparsifiers' sparsity_level is.
            alive = int(keep.sum())
            target_alive = int(round((1 - level) * keep.numel()))
            if target_alive < alive:
                keep = magnitude_mask(values, keep, 1 - target_alive / alive)
        options = {k: kwargs[k] for k in self._OPTIONS if k in kwargs}
        res = _layout(values * keep, keep, fqn, options)
        self.results[fqn] = res
        mask.data.copy_(torch.from_numpy(res.mask).to(mask.device, mask.dtype))


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _load_rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (a state dict of the unpruned model) into ``model``, whose pruned
    weights live in ``weight_orig``; masks stay."""
    own = model.state_dict()
    pairs, unknown = [], []
    for key, value in state.items():
        if key.endswith("_mask"):
            continue                           # masks are this round's, not the rewind's
        target = own.get(key)
        if target is None and key.endswith(".weight"):
            target = own.get(key + "_orig")
        if target is None:
            unknown.append(key)
        else:
            pairs.append((target, value))
    if unknown:  # checked before anything is copied: the model stays as it was
        raise RegroupError(f"imp_regroup: the rewind state has tensors the model lacks: "
                           f"{', '.join(unknown[:8])}; pass a state dict of this model")
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    with torch.no_grad():
        for _, m in _prunable(model):
            if hasattr(m, "weight_orig"):
                m.weight = m.weight_orig * m.weight_mask


def imp_regroup(model: nn.Module, train: Callable[[nn.Module, int], Any], *,
                rounds: int, sparsity: float, scope: str = "global",
                layers: Sequence[str] | None = None, block: Any = 32,
                method: str | None = "auto", format: str = "grid", budget: str = "iso",
                seed: int = 0, mode: str = "runtime", example_inputs: Any = None,
                rewind: Mapping[str, torch.Tensor] | str | None = "init",
                evaluate: Callable[[nn.Module], float] | None = None,
                callbacks: Sequence[Callable[[str, dict], None]] = (),
                final_train: bool = True) -> list[dict[str, Any]]:
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
    layers : list of str, optional
        Module names to prune (default: every Linear / Conv2d but the last, the classifier).
    method : str or None
        The regroup method ("auto", "metis", ... or "identity" for naive blocks without
        permutation); None gives plain unstructured IMP.
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

    Returns
    -------
    list of dict
        One record per training: round (0 is the dense model), sparsity of the selected
        layers' masks, score, and the plan the model was trained under (None for the
        dense round and without regrouping).
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"The 'scope' parameter of imp_regroup must be 'global' or 'layer'. "
                         f"Got {scope!r} instead.")
    if not 0 < sparsity < 1:
        raise ValueError(f"The 'sparsity' parameter of imp_regroup must be in (0, 1). Got "
                         f"{sparsity!r} instead.")
    modules = dict(_prunable(model))
    names = list(layers) if layers is not None else list(modules)[:-1]
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise RegroupError(f"imp_regroup: no Linear/Conv2d named {missing} in the model "
                           f"(have {list(modules)})")
    state0 = copy.deepcopy(model.state_dict()) if isinstance(rewind, str) else rewind
    if isinstance(rewind, str) and rewind != "init":
        raise ValueError(f"The 'rewind' parameter of imp_regroup must be 'init', a state "
                         f"dict or None. Got {rewind!r} instead.")
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
        if method is not None:
            plan = regroup_model(model, block=block, method=method, format=format,
                                 budget=budget, seed=seed, mode=mode, layers=names,
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
