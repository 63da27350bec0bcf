"""Where a module's mask lives: read and written in one place.

A weight ``module.<name>`` can be masked three ways:

- ``"prune"``: torch.nn.utils.prune holds the unmasked values in ``<name>_orig`` (a
  parameter) and the mask in ``<name>_mask`` (a buffer); a forward pre-hook recomputes
  ``<name>`` as their product.
- ``"ao"``: a torch.ao.pruning parametrization of ``<name>`` (``FakeSparsity``) holds the
  mask; the values are ``parametrizations.<name>.original``.
- ``"zeros"``: a plain parameter; reading takes its nonzeros as the mask, writing
  reparametrizes it with :func:`torch.nn.utils.prune.custom_from_mask`.

:func:`write_mask` replaces the mask in place, whichever holds it, so a block mask may
re-enable positions an earlier mask pruned: they come back with their unmasked values
(``<name>_orig`` / ``original``), or with ``values`` when given. Adding a second
``custom_from_mask`` to a pruned module would instead multiply the masks (a
``PruningContainer``), and the refilled positions would stay zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from regroup import RegroupError

__all__ = ["SOURCES", "mask_source", "ao_mask", "unmasked", "mask_target", "read_mask",
           "write_mask", "stored_tensors"]

SOURCES = ("prune", "ao", "zeros")


def ao_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask of a torch.ao.pruning parametrization of ``module.<name>``, or None."""
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            mask = getattr(p, "mask", None)
            if isinstance(mask, torch.Tensor):
                return mask
    return None


def _pruned(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name + "_orig", None), torch.Tensor) and \
        isinstance(getattr(module, name + "_mask", None), torch.Tensor)


def mask_source(module: nn.Module, name: str = "weight") -> str:
    """Which of :data:`SOURCES` holds the mask of ``module.<name>``."""
    if ao_mask(module, name) is not None:
        return "ao"
    if _pruned(module, name):
        return "prune"
    return "zeros"


def unmasked(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor holding ``module.<name>``'s unmasked values (what a refilled position
    gets): ``<name>_orig``, the parametrization's ``original``, or the weight itself."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    if _pruned(module, name):
        return getattr(module, name + "_orig")
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise RegroupError(f"{type(module).__name__} has no tensor {name!r} to mask")
    return t


def mask_target(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """:func:`unmasked`, after checking that :func:`write_mask` can set a mask there.

    Raises
    ------
    RegroupError
        No tensor ``name``, or it is parametrized without a mask (not torch.ao.pruning).
    """
    target = unmasked(module, name)
    if parametrize.is_parametrized(module, name) and ao_mask(module, name) is None:
        raise RegroupError(f"{type(module).__name__}.{name} is parametrized without a mask "
                           "(not torch.ao.pruning): cannot set its mask")
    return target


def read_mask(module: nn.Module, name: str = "weight"
              ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(masked values, mask, source)`` of ``module.<name>``, detached; the mask is
    boolean, the source one of :data:`SOURCES`."""
    source = mask_source(module, name)
    with torch.no_grad():
        if source == "ao":
            mask = ao_mask(module, name)
        elif source == "prune":
            mask = getattr(module, name + "_mask")
        else:
            mask = getattr(module, name) != 0
        mask = mask.detach().bool()
        return unmasked(module, name).detach() * mask, mask, source


def _as_tensor(x: Any, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if tuple(t.shape) != shape:
        raise RegroupError(f"{what} has shape {tuple(t.shape)}, the tensor {shape}")
    return t


def write_mask(module: nn.Module, name: str, mask: Any, values: Any = None) -> None:
    """Set the mask of ``module.<name>`` to ``mask`` (nonzero = kept), in place.

    The mask replaces whatever mask is there: torch.nn.utils.prune's ``<name>_mask``
    (and ``<name>`` is recomputed), a torch.ao.pruning parametrization's mask (same
    tensor object, so a sparsifier's state follows), or, on a plain parameter, a new
    :func:`torch.nn.utils.prune.custom_from_mask`. Positions the new mask re-enables
    take their unmasked values.

    Parameters
    ----------
    module : nn.Module
    name : str
        The tensor's attribute name (``"weight"``).
    mask : tensor or array of the tensor's shape
    values : tensor or array of the tensor's shape, optional
        Unmasked values to write first (IMP rewinds to early weights).

    Raises
    ------
    RegroupError
        No such tensor, a shape differs, or the tensor is parametrized without a mask;
        nothing is changed then.
    """
    target = mask_target(module, name)
    shape = tuple(target.shape)
    where = f"{type(module).__name__}.{name}"
    keep = _as_tensor(mask, f"the mask of {where}", shape).to(target.device).bool()
    if values is not None:
        values = _as_tensor(values, f"the values for {where}", shape)
    ao = ao_mask(module, name)
    pruned = _pruned(module, name)
    with torch.no_grad():
        if values is not None:
            target.copy_(values.to(device=target.device, dtype=target.dtype))
        if ao is not None:
            ao.copy_(keep.to(device=ao.device, dtype=ao.dtype))
            return
        if pruned:
            buf = getattr(module, name + "_mask")
            buf.copy_(keep.to(device=buf.device, dtype=buf.dtype))
            # What prune's forward pre-hook computes (again, with gradient, at every
            # forward); a leaf here, so that the module can be deep-copied.
            setattr(module, name, target * buf)
            return
    prune.custom_from_mask(module, name, keep)


def stored_tensors(module: nn.Module, name: str = "weight") -> list[torch.Tensor]:
    """Every tensor that stores ``module.<name>`` in its own shape: the weight (when it is
    not computed by a parametrization), ``<name>_orig``, ``<name>_mask``, the
    parametrization's ``original`` and masks; each once. Permuting them all permutes
    the weight and its mask together."""
    out = []
    parametrized = parametrize.is_parametrized(module, name)
    for key in ((name + "_orig", name + "_mask") if parametrized else
                (name, name + "_orig", name + "_mask")):
        t = getattr(module, key, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    if parametrized:
        out.append(module.parametrizations[name].original)
        for p in module.parametrizations[name]:
            mask = getattr(p, "mask", None)
            if isinstance(mask, torch.Tensor):
                out.append(mask)
    seen, unique = set(), []
    for t in out:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique
