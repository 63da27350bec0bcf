"""Apply regroup results to PyTorch modules.

Layer names in a result are the state-dict names of the weights (``"encoder.fc1.weight"``);
the module is everything before the last dot. Masks are set by
:func:`regroup.adapters.torch.masking.write_mask`: a plain weight gets
torch.nn.utils.prune's ``weight_orig`` / ``weight_mask`` (``prune.remove`` bakes them
in); a weight already pruned (prune or torch.ao.pruning) has its mask replaced, so the
refilled positions come back with their unmasked values.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

import numpy as np

from regroup import RegroupError, check_layout
from regroup.result import LayerResult

from ._holders import refuse_meta
from ._journal import atomic
from .masking import journaled_write_mask, mask_target

__all__ = ["apply_result"]


def _split(name: str) -> tuple[str, str]:
    """``(module, tensor attribute)`` of a layer named by any of its state-dict names:
    ``fc.weight``, prune's ``fc.weight_orig`` / ``fc.weight_mask``, a parametrization's
    ``fc.parametrizations.weight.original``."""
    head, marker, tail = name.rpartition(".parametrizations.")
    if marker and tail.endswith(".original") and tail.count(".") == 1:
        return head, tail[:-len(".original")]
    for suffix in ("_mask", "_orig"):
        name = name.removesuffix(suffix)
    module, _, tensor = name.rpartition(".")
    return module, tensor


def apply_result(model: torch.nn.Module, result: Mapping[str, LayerResult], *,
                 rewind: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Mask every layer of ``result`` in ``model`` with its refilled block mask.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place; use ``copy.deepcopy`` to keep the original. A layer may be
        plain, pruned by torch.nn.utils.prune or parametrized by torch.ao.pruning: its
        mask becomes exactly the block mask (refilled positions take the unmasked
        values, ``weight_orig`` or the parametrization's ``original``).
    result : mapping of layer name to LayerResult
        As returned by :func:`regroup.load_result` or built from ``Run.layers``.
    rewind : mapping of layer name to tensor, optional
        Values to put under the mask first (IMP-Regroup rewinds to early weights, so the
        refilled positions start from their rewound values instead of zero).

    Returns
    -------
    list of str
        The layer names masked, in result order.

    Raises
    ------
    RegroupError
        A layer is missing from the model, its shape (or its rewind value's) differs, its
        mask is not a union of whole blocks of its layout (:func:`regroup.check_layout`), it
        cannot be masked (a parametrization other than torch.ao.pruning's), two result
        layers name one tensor (``fc.weight`` and ``fc.parametrizations.weight.original``,
        or one module reached by two paths), or a tensor is on the meta device; nothing
        is changed then, nor after a failure part-way through (it is undone).
    """
    refuse_meta(model, "apply_result")
    plan = []
    modules = dict(model.named_modules(remove_duplicate=False))
    seen: dict[tuple[int, str], str] = {}
    for name, layer in result.items():
        mod_name, tensor = _split(name)
        module = modules.get(mod_name)
        if module is None or not isinstance(getattr(module, tensor, None), torch.Tensor):
            raise RegroupError(f"result layer {name!r} has no matching tensor in the model "
                               f"(looked for module {mod_name!r}, attribute {tensor!r})")
        other = seen.setdefault((id(module), tensor), name)
        if other != name:
            raise RegroupError(f"result layers {other!r} and {name!r} are one tensor of the "
                               f"model ({mod_name}.{tensor}): one mask would silently replace "
                               "the other; keep one of them")
        try:
            shape = tuple(mask_target(module, tensor).shape)
        except RegroupError as exc:
            raise RegroupError(f"result layer {name!r}: {exc}") from None
        if shape != tuple(layer.mask.shape):
            raise RegroupError(f"result layer {name!r} has shape {tuple(layer.mask.shape)}, "
                               f"the model's tensor {shape}")
        try:        # a result built or edited in memory is checked as a loaded one is
            check_layout(np.asarray(layer.mask2d, bool), layer.format, layer.block_shape,
                         layer.row_perm, layer.col_perm, layer.panel_cols, nm=layer.nm)
        except RegroupError as exc:
            raise RegroupError(f"result layer {name!r}: {exc}") from None
        values = None if rewind is None else rewind.get(name)
        if values is not None and tuple(values.shape) != shape:
            raise RegroupError(f"rewind value of {name!r} has shape {tuple(values.shape)}, "
                               f"the model's tensor {shape}")
        plan.append((name, module, tensor, layer, values))
    with atomic() as journal:
        for _, module, tensor, layer, values in plan:
            journaled_write_mask(journal, module, tensor, layer.mask, values)
    return [p[0] for p in plan]
