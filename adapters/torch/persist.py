"""Save and load block-sparse models without their plan: the layout travels with the values.

A block-sparse module's state dict holds its layout as persistent buffers beside its block
values (see :mod:`.sparse`: ``<module>.core.layout``, ``row_perm``, ``col_gather``,
``block_row``, ``block_col``, ``values``). :func:`load_block_sparse` rebuilds the
block-sparse modules of a freshly built dense model of the same architecture from those
buffers, checked, then loads every tensor: no plan, no regrouping. It takes the state dict
itself, a ``torch.save`` file of it, or the ``.safetensors`` file :func:`save_block_sparse`
writes (the same tensors, and a JSON header naming the block-sparse layers, read and
written by regroup's own safetensors code: no extra dependency).

What else a converted model carries is rebuilt too: torch.nn.utils.prune masks of the
layers that stayed dense-masked (``<name>_orig`` / ``<name>_mask``; torch.ao.pruning keeps
its masks out of the state dict, squash them first), the fold marker of a folded model
(:data:`~regroup.adapters.torch.FOLD_MARKER`; the folded permutations themselves are in
the parameters), ``use_nested_tensor = False`` on a ``TransformerEncoder`` holding
block-sparse modules.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import regroup
from regroup import RegroupError
from regroup.io.safetensors import (read_safetensors, safetensors_index, safetensors_metadata,
                                    write_safetensors)

from ._journal import atomic
from .masking import journaled_write_mask, mask_source
from .plan import FOLD_MARKER, disable_nested_tensor, prepare_for_load
from .semi_structured import NMLinear
from .sparse import (LAYOUT_KEYS, LAYOUT_VERSION, BlockSparseConv2d, BlockSparseLinear,
                     BlockSparseMultiheadAttention, BlockCore, stored_result)

__all__ = ["save_block_sparse", "load_block_sparse", "FILE_FORMAT"]

#: The ``format`` entry of the safetensors header written by :func:`save_block_sparse`.
FILE_FORMAT = "regroup.block_sparse"
_CORE = "core."
_SPARSE = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention, NMLinear)


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: description}`` of the block-sparse layers (their cores) and the
    N:M ones."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BlockCore):
            owner = name.removesuffix(".core")
            out[owner] = {"layer": m.name, "format": m.format, "block": list(m.block),
                          "shape": list(m.shape), "blocks": int(m.values.shape[0])}
        elif isinstance(m, NMLinear):
            out[name] = _nm_description(m.name, m.nm, m.weight.shape)
    return out


def _nm_description(layer: str, nm: torch.Tensor, shape: Any) -> dict[str, Any]:
    return {"layer": layer, "format": "nm", "nm": [int(v) for v in nm.reshape(-1)],
            "shape": [int(v) for v in shape]}


def save_block_sparse(model: nn.Module, path: str | os.PathLike, *,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model.state_dict()`` as a ``.safetensors`` file that
    :func:`load_block_sparse` turns back into the block-sparse model without its plan.

    Every tensor of the state dict is stored (block values and layout buffers included;
    bfloat16 widened to float32, exactly), and the header's ``__metadata__`` holds
    ``format`` (:data:`FILE_FORMAT`), ``layout_version``, ``layers`` (JSON: per
    block-sparse module its layer, format, block, shape and block count), the regroup
    and torch versions, and ``metadata``. The write is atomic.

    Parameters
    ----------
    model : nn.Module
        Typically after :func:`~regroup.adapters.torch.to_block_sparse`.
    path : str or path-like
    metadata : mapping of str to str, optional
        Extra header entries; their names may not be regroup's own.

    Raises
    ------
    TypeError
        A state dict entry that is not a tensor, or a metadata entry that is not a string.
    ValueError
        A metadata name regroup uses itself.
    """
    own = {"format": FILE_FORMAT, "layout_version": str(LAYOUT_VERSION),
           "layers": json.dumps(_layers(model), sort_keys=True),
           "regroup_version": regroup.__version__, "torch_version": torch.__version__}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"The 'metadata' parameter of save_block_sparse must map str to "
                            f"str. Got {key!r}: {type(value).__name__} instead.")
        if key in own:
            raise ValueError(f"The 'metadata' parameter of save_block_sparse may not set "
                             f"{key!r} (regroup's own entries: {sorted(own)}).")
    arrays = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_block_sparse: state dict entry {key!r} is a "
                            f"{type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        arrays[key] = t.contiguous().numpy()
    write_safetensors(arrays, path, {**own, **(metadata or {})})


def _read(source: Any) -> tuple[dict[str, Any], dict[str, str], str]:
    """(state dict, safetensors metadata or {}, what to call the source in errors)."""
    if isinstance(source, Mapping):
        return dict(source), {}, "the state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"The 'source' parameter of load_block_sparse must be a state dict "
                        f"or a path. Got {type(source).__name__} instead.")
    path = os.fspath(source)
    if path.lower().endswith(".safetensors"):
        index, _ = safetensors_index(path)
        arrays = read_safetensors(path, index=index)
        state = {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}
        return state, safetensors_metadata(path), path
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise RegroupError(f"{path}: not a state dict (a {type(state).__name__})")
    return dict(state), {}, path


def _check_metadata(meta: Mapping[str, str], found: Mapping[str, dict], where: str) -> None:
    """The header written by :func:`save_block_sparse` must agree with the tensors."""
    if meta.get("format") != FILE_FORMAT:
        return                      # another writer's file: the tensors alone decide
    if meta.get("layout_version") != str(LAYOUT_VERSION):
        raise RegroupError(f"{where}: layout version {meta.get('layout_version')!r}; this "
                           f"regroup reads version {LAYOUT_VERSION}")
    try:
        layers = json.loads(meta.get("layers", ""))
    except json.JSONDecodeError as exc:
        raise RegroupError(f"{where}: the 'layers' header entry is not JSON ({exc})") from None
    if not isinstance(layers, dict) or set(layers) != set(found):
        names = sorted(layers) if isinstance(layers, dict) else layers
        raise RegroupError(f"{where}: the header lists block-sparse layers {names}, the "
                           f"tensors hold {sorted(found)}")
    for name, want in found.items():
        got = layers[name]
        if not isinstance(got, dict) or {k: got.get(k) for k in want} != want:
            raise RegroupError(f"{where}: the header describes layer {name!r} as {got}, its "
                               f"tensors as {want}")


def load_block_sparse(model: nn.Module, source: Mapping[str, torch.Tensor] | str
                      | os.PathLike, *, backend: str = "auto", strict: bool = True
                      ) -> dict[str, str]:
    """Load a block-sparse model's state dict into a fresh dense ``model`` of the same
    architecture, rebuilding its block-sparse modules from the stored layouts; in place.

    For every block-sparse module in ``source`` (found by its ``<module>.core.layout``
    entry) the model's ``nn.Linear`` / ``nn.Conv2d`` of that name becomes a
    :class:`~regroup.adapters.torch.BlockSparseLinear` /
    :class:`~regroup.adapters.torch.BlockSparseConv2d`; an ``nn.MultiheadAttention`` whose
    ``in_proj`` and/or ``out_proj`` is stored block-sparse becomes a
    :class:`~regroup.adapters.torch.BlockSparseMultiheadAttention`. Prune masks of
    dense-masked layers and the fold marker are registered (see the module docstring),
    then every tensor is loaded. The model computes what the saved model computed.

    Parameters
    ----------
    model : nn.Module
        Freshly built, dense (pruned or not); its values are all replaced.
    source : state dict, or path to a ``.safetensors`` file (:func:`save_block_sparse`)
        or to a ``torch.save`` file of a state dict
    backend : {"auto", "bsr", "triton", "dense"}, default="auto"
        Of the rebuilt modules.
    strict : bool, default=True
        Refuse keys of ``source`` the rebuilt model lacks, and keys it has that
        ``source`` lacks (as ``load_state_dict``). Layouts are always checked.

    Returns
    -------
    dict of str to str
        ``{layer name: new module class}``, as :func:`~regroup.adapters.torch.to_block_sparse`
        (``"fc.weight": "BlockSparseLinear"``); ``"<encoder>.use_nested_tensor"`` when set.

    Raises
    ------
    RegroupError
        A stored layout is invalid (named by layer: missing key, index out of range, not a
        permutation, shape), its module is missing or of another kind or shape, a tensor
        has another shape than the rebuilt model's, keys differ (``strict``), or the
        safetensors header disagrees with the tensors. Nothing is changed then, nor
        when loading fails part-way through (every change is undone; the model's values
        are copied aside while it loads).
    FormatError
        A corrupt ``.safetensors`` file.
    """
    state, meta, where = _read(source)
    bad = [k for k, v in state.items() if not isinstance(k, str) or
           not isinstance(v, torch.Tensor)]
    if bad:
        raise RegroupError(f"{where}: entries that are not tensors named by strings: "
                           f"{bad[:5]}")
    modules = dict(model.named_modules())
    results, attention, found = _stored_layers(state, modules, where)
    _check_metadata(meta, found, where)
    new, done = _build(state, modules, results, attention, backend)
    # Everything is checked against the model-to-be before the model changes.
    after = {k: m for k, m in modules.items()
             if not any(k == n or k.startswith(n + ".") for n in new)}
    for name, m in new.items():
        after.update({f"{name}.{sub}" if sub else name: s for sub, s in m.named_modules()})
    masks = []
    for key in state:
        base = key.removesuffix("_mask")
        if key == base or base + "_orig" not in state:
            continue
        mod_name, _, attr = base.rpartition(".")
        m = after.get(mod_name)
        if m is not None and isinstance(getattr(m, attr, None), torch.Tensor) and \
                mask_source(m, attr) == "zeros":
            masks.append((m, attr, key))
    markers = [key for key in state if key.rpartition(".")[2] == FOLD_MARKER and
               key.rpartition(".")[0] in after]
    _check_fit(state, _expected_state(model, new, masks, markers), strict, where)

    # All or nothing: a failure below (a dtype load_state_dict cannot copy, an
    # interrupt) undoes every change, values included.
    with atomic() as journal:
        for name, m in new.items():
            parent, _, leaf = name.rpartition(".")
            ref = next(modules[name].parameters(), None)
            if ref is not None:
                m.to(ref.device)
            owner = model.get_submodule(parent) if parent else model
            journal.module(owner)
            setattr(owner, leaf, m)
        for m, attr, key in masks:
            journaled_write_mask(journal, m, attr, state[key])
        for key in markers:
            owner = key.rpartition(".")[0]
            target = model.get_submodule(owner) if owner else model
            journal.module(target)
            prepare_for_load(target)
        fresh = {id(t) for m in new.values() for t in m.state_dict(keep_vars=True).values()}
        for t in model.state_dict(keep_vars=True).values():
            if id(t) not in fresh:
                journal.values(t)
        model.load_state_dict(state, strict=strict)
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                journal.module(m)
        done.update(disable_nested_tensor(model))
    return done


def _stored_layers(state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module],
                   where: str) -> tuple[dict, dict, dict]:
    """The block-sparse layers of ``state``, checked against the model's ``modules``:
    ``{owner: (layer name, LayerResult)}``, ``{attention: {"in_proj" / "out_proj": owner}}``
    and ``{owner: description}`` (as the safetensors header has it)."""
    owners = sorted(k[:-len(_CORE + "layout")].removesuffix(".") for k in state
                    if k == _CORE + "layout" or k.endswith("." + _CORE + "layout"))
    results, attention, found = {}, {}, {}
    for owner, layer, part in _stored_nm(state, modules, where):
        results[owner] = (layer, part)
        found[owner] = _nm_description(layer, part["nm"], part["weight"].shape)
    for owner in owners:
        if not owner:
            raise RegroupError(f"{where}: the model itself is stored block-sparse; "
                               "load_block_sparse replaces submodules only")
        parent, _, leaf = owner.rpartition(".")
        module = modules.get(owner)
        if isinstance(module, _SPARSE) or isinstance(modules.get(parent), _SPARSE):
            raise RegroupError(f"{where}: {owner!r} is already block-sparse in the model; "
                               "load_block_sparse takes a dense model (use "
                               "model.load_state_dict for a converted one)")
        if isinstance(modules.get(parent), nn.MultiheadAttention) and \
                leaf in ("in_proj", "out_proj"):
            why = BlockSparseMultiheadAttention.unsupported(modules[parent])
            if why is not None:
                raise RegroupError(f"{where}: {owner!r} is stored block-sparse, but {why}")
            E = modules[parent].embed_dim
            shape = (3 * E, E) if leaf == "in_proj" else (E, E)
            layer = f"{parent}.in_proj_weight" if leaf == "in_proj" else f"{owner}.weight"
            attention.setdefault(parent, {})[leaf] = owner
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight
            shape, layer = (w.shape[0], w[0].numel()), f"{owner}.weight"
        else:
            raise RegroupError(f"{where}: {owner!r} is stored block-sparse, but the model "
                               f"has {'no module' if module is None else type(module).__name__}"
                               " there (expected nn.Linear, nn.Conv2d, or the in_proj / "
                               "out_proj of an nn.MultiheadAttention)")
        prefix = f"{owner}.{_CORE}"
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        r = stored_result(layer, part, shape)
        results[owner] = (layer, r)
        found[owner] = {"layer": layer, "format": r.format, "block": list(r.block_shape),
                        "shape": list(shape), "blocks": int(part["values"].shape[0])}
    return results, attention, found


def _stored_nm(state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module],
               where: str) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """``(owner, layer name, its entries)`` of every NMLinear stored in ``state`` (found
    by its ``<module>.nm``, ``.mask`` and ``.col_gather`` entries), each an
    ``nn.Linear`` of the model of the stored shape."""
    out = []
    for key in sorted(state):
        owner = key[:-len(".nm")] if key.endswith(".nm") else None
        if owner is None or any(f"{owner}.{k}" not in state for k in NMLinear.STATE_KEYS):
            continue
        module = modules.get(owner)
        if isinstance(module, _SPARSE):
            raise RegroupError(f"{where}: {owner!r} is already sparse in the model; "
                               "load_block_sparse takes a dense model")
        part = {k[len(owner) + 1:]: v for k, v in state.items()
                if k.startswith(owner + ".") and "." not in k[len(owner) + 1:]}
        if not isinstance(module, nn.Linear):
            kind = "no module" if module is None else type(module).__name__
            raise RegroupError(f"{where}: {owner!r} is stored as an N:M Linear, but the "
                               f"model has {kind} there (expected nn.Linear)")
        shape = tuple(part.get("weight", torch.empty(0)).shape)
        if shape != tuple(module.weight.shape):
            raise RegroupError(f"{where}: {owner!r} is stored with weight {shape}, the "
                               f"model's is {tuple(module.weight.shape)}")
        out.append((owner, f"{owner}.weight", part))
    return out


def _build(state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module],
           results: dict, attention: dict, backend: str
           ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The new modules, by the name they replace (the model is not changed), and the
    report; each core must reproduce its stored layout exactly (its canonical order)."""
    new: dict[str, nn.Module] = {}
    done: dict[str, str] = {}
    for parent, leaves in attention.items():
        layouts = {k: results[o][1] for k, o in leaves.items()}
        new[parent] = BlockSparseMultiheadAttention(modules[parent], **layouts,
                                                    backend=backend)
        done.update({results[o][0]: "BlockSparseMultiheadAttention" for o in leaves.values()})
    for owner, (layer, r) in results.items():
        if owner.rpartition(".")[0] in attention:
            continue
        if isinstance(r, Mapping):                    # an N:M layer's stored entries
            new[owner] = NMLinear.from_state(layer, r, backend=backend)
            done[layer] = "NMLinear"
            continue
        module = modules[owner]
        new[owner] = (BlockSparseLinear(r, module.weight.detach(), module.bias, backend=backend)
                      if isinstance(module, nn.Linear) else
                      BlockSparseConv2d(r, module, backend=backend))
        done[layer] = type(new[owner]).__name__
    for owner, (layer, r) in results.items():
        if isinstance(r, Mapping):
            continue
        parent, _, leaf = owner.rpartition(".")
        core = (new[parent].get_submodule(leaf) if parent in attention else new[owner]).core
        for key in LAYOUT_KEYS:
            if not torch.equal(getattr(core, key),
                               state[f"{owner}.{_CORE}{key}"].to(torch.int64).cpu()):
                raise RegroupError(f"layer {layer!r}: {owner}.{_CORE}{key} is not in the "
                                   "canonical order of a saved block-sparse module")
    return new, done


def _check_fit(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
               strict: bool, where: str) -> None:
    wrong = [f"{k!r} has shape {tuple(state[k].shape)}, the model's {want}"
             for k, want in expected.items() if k in state and tuple(state[k].shape) != want]
    if wrong:
        raise RegroupError(f"{where}: {len(wrong)} tensor(s) do not fit the rebuilt model: "
                           + "; ".join(wrong[:5]))
    if strict:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise RegroupError(
                f"{where} does not fit the model (strict=True): missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}")


def _expected_state(model: nn.Module, new: Mapping[str, nn.Module], masks: list,
                    markers: list[str]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict ``model`` will have once ``new`` replaces its
    modules, ``masks`` are registered and the fold ``markers`` exist (nothing changed)."""
    out = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not any(k.startswith(n + ".") for n in new)}
    for name, m in new.items():
        out.update({f"{name}.{k}": tuple(v.shape) for k, v in m.state_dict().items()})
    for m, attr, key in masks:
        base = key.removesuffix("_mask")
        shape = tuple(getattr(m, attr).shape)
        out.pop(base, None)
        out[base + "_orig"] = out[base + "_mask"] = shape
    for key in markers:
        out[key] = ()
    return out
