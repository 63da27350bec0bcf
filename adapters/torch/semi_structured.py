"""N:M-sparse Linear modules: a plan's N:M layers, run by torch's 2:4 kernels where they
exist and as the masked dense product elsewhere.

An :class:`NMLinear` stores its weight in the model's coordinates (the N:M mask applied;
the mask kept as a buffer, so training keeps the structure), the N:M pattern and the
layer's input-column order (``col_gather``: the identity when the plan folded it into the
producing layer, else a gather before the product).

Execution paths (``backend``):

- ``"dense"``: ``F.linear`` with the masked weight, no permutation: what the masked model
  computes. There is no CPU N:M kernel in PyTorch, so this is the only path on the CPU.
- ``"semi_structured"``: :func:`torch.sparse.to_sparse_semi_structured` on the permuted
  weight (compressed once per weight version) and ``F.linear`` on the gathered input:
  NVIDIA's sparse tensor cores (CUDA, compute capability >= 8.0, 2:4, float16 or
  bfloat16, at least 32 output and 64 input features, multiples of those; see
  :func:`semi_structured_problem`), inference only (torch's compressed tensor has no
  gradient for its values here).
- ``"auto"`` (default): where ``semi_structured`` can run, the first call of each class of
  inputs (device, dtype, batch size class, grad mode) times both paths on that very input
  (:func:`~regroup.adapters.torch.sparse.time_paths`, :data:`~.sparse.TIME_BUDGET`) and
  keeps ``semi_structured`` only when it beat dense by the margin (:data:`~.sparse.MARGIN`);
  everywhere else ``dense``. Choices are in ``dispatch_log``, logged at INFO.

While traced (``torch.export``, ``torch.jit.trace``) the dense path runs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regroup import RegroupError
from regroup.nm import check_nm, check_nm_mask
from regroup.result import LayerResult

from .sparse import MARGIN, TIME_BUDGET, describe_key, dispatch_key, time_paths

__all__ = ["NMLinear", "NM_BACKENDS", "semi_structured_problem"]

logger = logging.getLogger(__name__)

NM_BACKENDS = ("auto", "semi_structured", "dense")
# torch's CUTLASS 2:4 kernels (torch.sparse.SparseSemiStructuredTensorCUTLASS): the
# weight's rows and columns must be multiples of these (cuSPARSELt's are smaller).
_MIN_SHAPE = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}


def semi_structured_problem(nm: tuple[int, int], shape: tuple[int, int],
                            device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's 2:4 kernel cannot run an N:M weight of ``shape`` (out, in) on
    ``device`` in ``dtype``, or None when it can."""
    if tuple(nm) != (2, 4):
        return f"torch's semi-structured kernels run 2:4 only, not {nm[0]}:{nm[1]}"
    if device.type != "cuda":
        return f"torch's semi-structured kernels need CUDA (no {device.type} kernel exists)"
    if dtype not in _MIN_SHAPE:
        return f"torch's semi-structured kernels take float16 or bfloat16, not {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "sparse tensor cores need compute capability 8.0 or higher"
    rows, cols = _MIN_SHAPE[dtype]
    if shape[0] % rows or shape[1] % cols:
        return (f"the weight {shape[0]}x{shape[1]} is not a multiple of {rows}x{cols}, the "
                "smallest shape torch's 2:4 kernels take")
    return None


class NMLinear(nn.Module):
    """A Linear layer whose weight is N:M sparse along its permuted input columns.

    Parameters
    ----------
    result : LayerResult
        The layer's N:M layout (format "nm") in the coordinates of ``weight``
        (:meth:`~regroup.adapters.torch.Plan.current_result` after folding); its mask
        must be N:M after its ``col_perm`` (checked).
    weight : Tensor of shape (out_features, in_features)
        Values; those outside the mask are dropped.
    bias : Tensor of shape (out_features,), optional
    backend : {"auto", "semi_structured", "dense"}, default="auto"
        See the module docstring.
    """

    def __init__(self, result: LayerResult, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        if backend not in NM_BACKENDS:
            raise ValueError(f"The 'backend' parameter of NMLinear must be one of "
                             f"{NM_BACKENDS}. Got {backend!r} instead.")
        if result.format != "nm" or result.nm is None:
            raise RegroupError(f"layer {result.name!r}: NMLinear runs N:M layouts (format "
                               f"'nm'), not {result.format!r}")
        if weight.dim() != 2 or tuple(weight.shape) != tuple(result.shape):
            raise RegroupError(f"layer {result.name!r}: the layout has shape "
                               f"{tuple(result.shape)}, the weight {tuple(weight.shape)}")
        try:
            check_nm_mask(result.mask2d, result.nm, result.col_perm)
        except RegroupError as exc:
            raise RegroupError(f"layer {result.name!r}: {exc}") from None
        self.name = result.name
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        mask = torch.from_numpy(np.asarray(result.mask2d, bool)).to(weight.device)
        self.register_buffer("mask", mask)
        self.register_buffer("col_gather", torch.from_numpy(
            np.asarray(result.col_perm, np.int64)).to(weight.device))
        self.register_buffer("nm", torch.tensor(result.nm, dtype=torch.int64))
        self.weight = nn.Parameter(weight.detach() * mask)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.identity = bool(np.array_equal(result.col_perm, np.arange(self.in_features)))
        self.dispatch_log: dict[tuple, str] = {}
        self._packed: tuple[tuple, Any] | None = None

    #: The persistent buffers that mark an NMLinear in a state dict (with weight, bias).
    STATE_KEYS = ("mask", "col_gather", "nm")

    @classmethod
    def from_state(cls, layer: str, part: Mapping[str, torch.Tensor], *,
                   backend: str = "auto") -> NMLinear:
        """Rebuild from the entries of a saved NMLinear's state dict (``weight``,
        ``bias`` if any, ``mask``, ``col_gather``, ``nm``: keys without the module
        prefix), checked: RegroupError naming ``layer`` when they do not make an N:M
        layer (wrong shapes, an order that is not a permutation, a mask that is not N:M
        after it, a mask that is not 0/1)."""
        def fail(msg: str) -> RegroupError:
            return RegroupError(f"layer {layer!r}: the stored N:M layer {msg}")

        missing = [k for k in ("weight", *cls.STATE_KEYS) if k not in part]
        if missing:
            raise fail(f"lacks {missing}")
        weight, mask = part["weight"], part["mask"]
        nm = part["nm"].detach().cpu().reshape(-1).tolist()
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise fail(f"has weight {tuple(weight.shape)} and mask {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise fail("has a mask that is not 0/1")
        try:
            nm = check_nm(tuple(int(v) for v in nm), "NMLinear.from_state")
        except (TypeError, ValueError) as exc:
            raise fail(f"has nm {nm}: {exc}") from None
        gather = part["col_gather"].detach().cpu().to(torch.int64).numpy()
        cols = weight.shape[1]
        if gather.shape != (cols,) or not np.array_equal(np.sort(gather), np.arange(cols)):
            raise fail(f"has a col_gather that is not a permutation of its {cols} columns")
        mask2d = mask.detach().cpu().bool().numpy()
        result = LayerResult(name=layer, shape=tuple(weight.shape), mask=mask2d,
                             row_perm=np.arange(weight.shape[0]), col_perm=gather,
                             panel_cols=None, block_shape=(1, nm[1]), format="nm",
                             method="stored", nm=nm)
        return cls(result, weight.detach(), part.get("bias"), backend=backend)

    def dense_weight(self) -> torch.Tensor:
        """The masked weight, original input order (what the masked model multiplies)."""
        return self.weight * self.mask

    def _why_not(self, x: torch.Tensor) -> list[str]:
        """Why ``semi_structured`` cannot run input ``x`` (empty when it can)."""
        why = [semi_structured_problem(tuple(self.nm.tolist()), (
            self.out_features, self.in_features), x.device, x.dtype)]
        if torch.is_grad_enabled():
            why.append("it runs in inference only (torch.no_grad)")
        return [w for w in why if w]

    def paths(self, x: torch.Tensor) -> list[str]:
        """The paths that can run input ``x`` (dense always)."""
        return ["dense"] if self._why_not(x) else ["dense", "semi_structured"]

    def _semi_structured(self, x2d: torch.Tensor) -> torch.Tensor:
        key = (self.weight._version, self.weight.device, self.weight.dtype)
        if self._packed is None or self._packed[0] != key:
            w = self.dense_weight().detach()
            if not self.identity:
                w = w[:, self.col_gather]
            self._packed = (key, torch.sparse.to_sparse_semi_structured(w.contiguous()))
        if not self.identity:
            x2d = x2d.index_select(1, self.col_gather)
        return F.linear(x2d, self._packed[1], self.bias)

    def _run(self, x2d: torch.Tensor, path: str) -> torch.Tensor:
        if path == "dense":
            return F.linear(x2d, self.dense_weight(), self.bias)
        return self._semi_structured(x2d)

    def _choose(self, x2d: torch.Tensor) -> str:
        paths = self.paths(x2d)
        if self.backend != "auto":
            if self.backend not in paths:
                raise RegroupError(f"layer {self.name!r}: backend 'semi_structured' cannot "
                                   f"run this input: {'; '.join(self._why_not(x2d))}; use "
                                   "backend 'auto' or 'dense'")
            return self.backend
        if len(paths) == 1 or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return "dense"
        key = dispatch_key(x2d)
        choice = self.dispatch_log.get(key)
        if choice is None:
            times, rounds, seconds = time_paths(lambda p: self._run(x2d, p), paths,
                                                TIME_BUDGET, x2d.device.type)
            fast = times["semi_structured"] < MARGIN * times["dense"]
            choice = self.dispatch_log[key] = "semi_structured" if fast else "dense"
            logger.info("%s: %s for %s (%s; %d rounds in %.1f ms)", self.name, choice,
                        describe_key(key),
                        ", ".join(f"{p} {1e3 * t:.3g} ms" for p, t in times.items()),
                        rounds, 1e3 * seconds)
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self._run(x2d, self._choose(x2d))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        n, m = self.nm.tolist()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nm={n}:{m}, gather={not self.identity}, backend={self.backend}")
