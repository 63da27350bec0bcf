"""Apply regroup results to PyTorch modules.

Layer names in a result are the state-dict names of the weights (``"encoder.fc1.weight"``);
the module is everything before the last dot. Masks go through
:func:`torch.nn.utils.prune.custom_from_mask`, so the model follows the usual
``weight_orig`` / ``weight_mask`` convention and ``prune.remove`` bakes them in.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.utils import prune

from regroup import RegroupError
from regroup.result import LayerResult

__all__ = ["apply_result"]


def _split(name: str) -> tuple[str, str]:
    for suffix in ("_mask", "_orig"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    module, _, tensor = name.rpartition(".")
    return module, tensor


def apply_result(model: torch.nn.Module, result: Mapping[str, LayerResult], *,
                 rewind: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Mask every layer of ``result`` in ``model`` with its refilled block mask.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place; use ``copy.deepcopy`` to keep the original.
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
        A layer is missing from the model or its shape differs; nothing is changed then.
    """
    plan = []
    modules = dict(model.named_modules())
    for name, layer in result.items():
        mod_name, tensor = _split(name)
        module = modules.get(mod_name)
        if module is None or not hasattr(module, tensor):
            raise RegroupError(f"result layer {name!r} has no matching tensor in the model "
                               f"(looked for module {mod_name!r}, attribute {tensor!r})")
        current = getattr(module, tensor)
        if tuple(current.shape) != tuple(layer.mask.shape):
            raise RegroupError(f"result layer {name!r} has shape {tuple(layer.mask.shape)}, "
                               f"the model's tensor {tuple(current.shape)}")
        plan.append((name, module, tensor, layer))
    for name, module, tensor, layer in plan:
        if rewind is not None and name in rewind:
            target = getattr(module, tensor + "_orig", None)
            target = target if target is not None else getattr(module, tensor)
            with torch.no_grad():
                target.copy_(rewind[name].to(target.dtype))
        mask = torch.from_numpy(layer.mask).to(device=getattr(module, tensor).device)
        prune.custom_from_mask(module, tensor, mask)
    return [p[0] for p in plan]
