"""Who holds which tensor in a model: tied weights and shared memory.

:class:`Holders` indexes every tensor a model holds (parameters, buffers, plain tensor
attributes such as torch.nn.utils.prune's recomputed ``weight``) by the slots that hold
it, so that a tensor reached from two places (tied weights: ``b.weight = a.weight``) or
two tensors sharing memory are seen before one of them is permuted in place.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from regroup import RegroupError

__all__ = ["Holders", "refuse_meta"]

Slot = tuple[int, str]          # (id of the owning module, attribute name)


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``module`` itself holds: parameters, buffers, plain tensor attributes."""
    for key, t in module._parameters.items():
        if t is not None:
            yield key, t
    for key, t in module._buffers.items():
        if t is not None:
            yield key, t
    for key, t in module.__dict__.items():
        if isinstance(t, torch.Tensor):
            yield key, t


def _extent(t: torch.Tensor) -> tuple[Any, int, int] | None:
    """``(storage key, first byte, end byte)`` of the memory ``t`` spans, or None when it
    has none to share (empty, meta, or a layout without one storage)."""
    if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    size = t.element_size()
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    start = t.storage_offset() * size
    return (str(t.device), ptr), start, start + span * size


class Holders:
    """Every tensor of ``model`` with the slots that hold it.

    A slot is ``(id(module), attribute)``; a module reached by two paths is one module
    (its slots are named by its first path). ``names[slot]`` is the state-dict style
    name (``"b.weight_orig"``, ``"a.parametrizations.weight.original"``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[Slot, str] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        self._memory: dict[Any, list[tuple[int, int, int]]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            for key, t in _own_tensors(m):
                slot = (id(m), key)
                if slot in self.names:
                    continue
                self.names[slot] = f"{path}.{key}" if path else key
                if id(t) not in self.tensors:
                    self.tensors[id(t)] = t
                    ext = _extent(t)
                    if ext is not None:
                        self._memory.setdefault(ext[0], []).append((id(t), ext[1], ext[2]))
                self.slots.setdefault(id(t), []).append(slot)

    def name(self, t: torch.Tensor) -> str:
        """The first name of ``t`` (``"<unnamed tensor>"`` when the model lacks it)."""
        slots = self.slots.get(id(t))
        return self.names[slots[0]] if slots else "<unnamed tensor>"

    def overlapping(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The other tensors of the model whose memory overlaps ``t``'s (views, or
        parameters made from one another's ``.data``)."""
        ext = _extent(t)
        if ext is None:
            return []
        key, start, end = ext
        return [self.tensors[i] for i, s, e in self._memory.get(key, [])
                if i != id(t) and s < end and start < e]


def refuse_meta(model: nn.Module, caller: str) -> None:
    """Raise RegroupError naming the first parameter or buffer of ``model`` on the meta
    device: it has no data to read, mask or permute."""
    for name, t in (*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)):
        if t.device.type == "meta":
            raise RegroupError(
                f"{caller}: {type(model).__name__} parameter {name!r} is on the meta device "
                f"(shape {tuple(t.shape)}, no data); materialise the model first "
                "(model.to_empty(device=...) then load_state_dict, or "
                "load_state_dict(..., assign=True))")
