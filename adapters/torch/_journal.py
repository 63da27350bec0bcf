"""All-or-nothing changes to a live model: an undo log.

:func:`atomic` gives the entry points that change a model in place (``Plan.apply``,
``Plan.fold``, ``apply_result``, ...) an undo log: every change goes through a
:class:`Journal`, and any exception part-way through undoes what was done, so the model
is left exactly as it was (its tensors bit for bit, its parameters, buffers, hooks and
module classes). The entry points validate everything they can first; the journal is the
backstop for what validation cannot foresee (a parametrization that fails, a device
error, an interrupt).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["Journal", "atomic", "training_flags"]

class Journal:
    """An undo log of in-place changes to modules and tensors; :meth:`rollback` reverts
    them, newest first. Each change is recorded before it is made."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._modules: set[int] = set()
        self._values: set[int] = set()
        self._keep: list[Any] = []          # keeps recorded objects alive (ids stay unique)

    def module(self, module: nn.Module) -> None:
        """Record ``module``'s structure (class, parameters, buffers, hooks, plain
        attributes; not tensor values) before it changes; once per module."""
        if id(module) in self._modules:
            return
        self._modules.add(id(module))
        self._keep.append(module)
        cls = module.__class__
        saved = {k: (v, _contents(v)) for k, v in module.__dict__.items()}

        def undo() -> None:
            d = module.__dict__
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, (v, contents) in saved.items():
                if contents is not None:
                    # The same container object: hook handles hold weak references to it.
                    v.clear()
                    v.update(contents)
                d[k] = v
            module.__class__ = cls
        self._undo.append(undo)

    def values(self, t: torch.Tensor) -> None:
        """Record ``t``'s values before it is overwritten in place; once per tensor."""
        if id(t) in self._values:
            return
        self._values.add(id(t))
        self._keep.append(t)
        old = _binary(t)
        if old is None:
            old = t.detach().clone()

        def undo() -> None:
            with torch.no_grad():
                t.copy_(old)
        self._undo.append(undo)

    def permute(self, t: torch.Tensor, dim: int, perm: torch.Tensor) -> None:
        """Permute ``t`` along ``dim`` in place (``t[i] <- t[perm[i]]``); undone by the
        inverse permutation (exact: values are moved, not computed)."""
        perm = perm.to(t.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        with torch.no_grad():
            t.copy_(t.index_select(dim, perm))
        self._keep.append(t)

        def undo() -> None:
            with torch.no_grad():
                t.copy_(t.index_select(dim, inverse))
        self._undo.append(undo)

    def call(self, undo: Callable[[], None]) -> None:
        """Record an arbitrary undo step."""
        self._undo.append(undo)

    def rollback(self) -> None:
        """Undo every recorded change, newest first; every step runs even if one fails
        (the first failure is raised after)."""
        first: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:  # noqa: BLE001 - finish the rollback first
                first = first or exc
        if first is not None:
            raise first


def _binary(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a bool tensor when that restores it bit for bit (a float mask of +0.0 and
    1.0: a quarter of the memory of a float32 copy), else None."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    keep = t.detach() != 0
    if torch.equal(keep.to(t.dtype), t.detach()) and not bool(torch.signbit(t.detach()).any()):
        return keep
    return None


def _contents(v: Any) -> Any:
    """A shallow copy of a mutable container held by a module (its parameter, buffer,
    module and hook dicts, its non-persistent buffer set), else None."""
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, set):
        return set(v)
    return None


@contextmanager
def atomic() -> Iterator[Journal]:
    """A :class:`Journal` whose changes are rolled back if the block raises (any
    exception, KeyboardInterrupt included); the exception propagates."""
    journal = Journal()
    try:
        yield journal
    except BaseException:
        journal.rollback()
        raise


@contextmanager
def training_flags(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit: ``model.train(flag)`` alone
    would set them all to the model's, losing a mix (a frozen BatchNorm in eval mode
    inside a model in training mode)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
