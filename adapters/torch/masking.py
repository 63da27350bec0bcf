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

A weight computed any other way (``weight_norm``'s magnitude and direction, a custom
parametrization, a hook recomputing a plain attribute) is not masked values of one tensor:
:func:`mask_problem` says why, and :func:`read_mask` / :func:`write_mask` refuse it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from regroup import RegroupError

__all__ = ["SOURCES", "mask_source", "ao_mask", "unmasked", "mask_target", "read_mask",
           "write_mask", "stored_tensors", "stored_slots", "mask_problem", "permute_problem"]

SOURCES = ("prune", "ao", "zeros")


def ao_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask of a torch.ao.pruning parametrization of ``module.<name>``, or None."""
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            mask = getattr(p, "mask", None)
            if isinstance(mask, torch.Tensor):
                return mask
    return None


def mask_problem(module: nn.Module, name: str = "weight") -> str | None:
    """Why the mask of ``module.<name>`` cannot be read or set, or None.

    A parametrized tensor is masked exactly only when it is ``mask * original``: every
    parametrization on it holds a mask of its shape (torch.ao.pruning's FakeSparsity).
    Others (``weight_norm``'s magnitude and direction, a scaling, an orthogonal map) compute
    the weight from tensors a mask over the weight does not cover.
    """
    if not parametrize.is_parametrized(module, name):
        t = getattr(module, name, None)
        if _pruned(module, name) or not isinstance(t, torch.Tensor) or \
                isinstance(module._parameters.get(name), nn.Parameter):
            return None
        return (f"it is {_not_a_parameter(module, name)}; torch.nn.utils.prune masks "
                "parameters only")
    plist = module.parametrizations[name]
    kinds = ", ".join(type(p).__name__ for p in plist)
    original = getattr(plist, "original", None)
    if not isinstance(original, torch.Tensor):
        return (f"it is computed by the parametrization {kinds} from several tensors "
                f"({', '.join(n for n, _ in plist.named_parameters(recurse=False))}; "
                "weight_norm keeps a magnitude and a direction), not masked values of one "
                "tensor; remove it first (torch.nn.utils.parametrize."
                f"remove_parametrizations(module, {name!r}))")
    shape = tuple(original.shape)
    for p in plist:
        mask = getattr(p, "mask", None)
        if not isinstance(mask, torch.Tensor):
            within = f" (in {kinds})" if len(plist) > 1 else ""
            return (f"it is parametrized by {type(p).__name__}{within}, which holds no "
                    "mask (not torch.ao.pruning's FakeSparsity): its values are not "
                    "mask * original; remove it first (torch.nn.utils.parametrize."
                    f"remove_parametrizations(module, {name!r}))")
        if tuple(mask.shape) != shape:
            return (f"the mask of its parametrization {type(p).__name__} has shape "
                    f"{tuple(mask.shape)}, the weight {shape}")
    return None


def _not_a_parameter(module: nn.Module, name: str) -> str:
    if name in module._buffers:
        return "a buffer, not a parameter"
    if isinstance(getattr(module, name + "_g", None), torch.Tensor) and \
            isinstance(getattr(module, name + "_v", None), torch.Tensor):
        return (f"recomputed from {name}_g and {name}_v at every call "
                "(torch.nn.utils.weight_norm), not a parameter")
    return "a plain tensor attribute (recomputed by a hook?), not a parameter"


def permute_problem(module: nn.Module, name: str) -> str | None:
    """Why ``module.<name>`` cannot be permuted in place along an axis (None when it can):
    a parametrization other than masks, or a hook recomputing it at every call
    (torch.nn.utils.weight_norm), would compute it again from tensors left in their order.
    """
    if parametrize.is_parametrized(module, name):
        return mask_problem(module, name)
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor) or _pruned(module, name) or \
            name in module._parameters or name in module._buffers:
        return None
    return f"it is {_not_a_parameter(module, name)}: permuting it would not last"


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
        No tensor ``name``, or it is parametrized other than by masks (see
        :func:`mask_problem`).
    """
    why = mask_problem(module, name)
    if why is not None:
        raise RegroupError(f"{type(module).__name__}.{name}: cannot set its mask: {why}")
    return unmasked(module, name)


def read_mask(module: nn.Module, name: str = "weight"
              ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(masked values, mask, source)`` of ``module.<name>``, detached; the mask is
    boolean, the source one of :data:`SOURCES`.

    Raises
    ------
    RegroupError
        It is parametrized other than by masks (see :func:`mask_problem`).
    """
    why = mask_problem(module, name)
    if why is not None:
        raise RegroupError(f"{type(module).__name__}.{name}: cannot read its mask: {why}")
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


def journaled_write_mask(journal: Any, module: nn.Module, name: str, mask: Any,
                         values: Any = None) -> None:
    """:func:`write_mask` through an undo ``journal``
    (:class:`~regroup.adapters.torch._journal.Journal`): the module's structure (prune
    adds ``<name>_orig``, ``<name>_mask`` and a hook) and every tensor it overwrites (the
    mask; the unmasked values when ``values`` is given) are recorded first."""
    journal.module(module)
    source = mask_source(module, name)
    if source == "ao":
        journal.values(ao_mask(module, name))
    elif source == "prune":
        journal.values(getattr(module, name + "_mask"))
    if values is not None:
        journal.values(mask_target(module, name))
    write_mask(module, name, mask, values)


def stored_slots(module: nn.Module, name: str = "weight") -> list[tuple[nn.Module, str]]:
    """Every ``(owner module, attribute)`` that stores ``module.<name>`` in its own shape:
    the weight (when no parametrization computes it), ``<name>_orig``, ``<name>_mask``,
    the parametrization's ``original`` and masks. Two slots may hold one tensor."""
    out = []
    parametrized = parametrize.is_parametrized(module, name)
    for key in ((name + "_orig", name + "_mask") if parametrized else
                (name, name + "_orig", name + "_mask")):
        if isinstance(getattr(module, key, None), torch.Tensor):
            out.append((module, key))
    if parametrized:
        plist = module.parametrizations[name]
        if isinstance(getattr(plist, "original", None), torch.Tensor):
            out.append((plist, "original"))
        for p in plist:
            if isinstance(getattr(p, "mask", None), torch.Tensor):
                out.append((p, "mask"))
    return out


def stored_tensors(module: nn.Module, name: str = "weight") -> list[torch.Tensor]:
    """The tensors of :func:`stored_slots`, each once. Permuting them all permutes the
    weight and its mask together."""
    seen, unique = set(), []
    for owner, key in stored_slots(module, name):
        t = getattr(owner, key)
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique
