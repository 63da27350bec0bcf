"""Calibration: how large each weight's input is, so blocks are ranked by what they carry.

A block mask keeps a few b x b blocks of each weight; which ones matter depends on the
inputs they multiply as much as on |w|. As Wanda does for unstructured pruning,
:func:`input_scales` measures on calibration batches the L2 norm of every input feature of
each Linear, Conv2d (per input channel and kernel position: the columns of the weight as a
matrix) and ``nn.MultiheadAttention.in_proj_weight`` (its q, k and v rows each see their own
input). :func:`regroup.adapters.torch.regroup_model` with ``calibration=`` ranks blocks by
``|w_ij| * ||x_j||`` instead of ``|w_ij|``: on all-MiniLM-L6-v2 at 80 % sparsity
(``benchmarks/README.md``) that kept blocks that recovered to a clearly better model.

Weights whose module is never called as a module (``nn.MultiheadAttention.out_proj``,
whose weight the attention reads directly) are not in the result.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regroup import RegroupError
from regroup.validation import check_int

from ._journal import training_flags

__all__ = ["input_scales", "input_scales_targets", "check_scales", "call_model"]


def call_model(model: nn.Module, batch: Any, device: torch.device | None = None) -> Any:
    """Run ``model`` on one batch: a tensor (``model(x)``), a tuple or list
    (``model(*x)``) or a dict (``model(**x)``, e.g. a tokenizer's output); tensors are
    moved to ``device`` when given."""
    def to(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) and device is not None else x
    if isinstance(batch, dict):
        return model(**{k: to(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(*(to(x) for x in batch))
    return model(to(batch))


def _columns_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of the last dimension's features over every other dimension."""
    x = x.detach().to(torch.float64)
    return (x * x).reshape(-1, x.shape[-1]).sum(0)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) of the convolution's padding."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _conv_columns_sq(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each column of the im2col matrix the convolution multiplies: column
    ``c * kh * kw + i * kw + j`` reads input channel ``c`` at kernel offset ``(i, j)``."""
    x = x.detach().to(torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    sq = F.pad(x, _conv_padding(conv), mode=mode) ** 2
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    H, W = sq.shape[-2:]
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    out = sq.new_zeros((sq.shape[1], kh, kw))
    for i in range(kh):          # kernel offsets (at most a few dozen), not elements
        for j in range(kw):
            win = sq[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                     j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out[:, i, j] = win.sum(dim=(0, 2, 3))
    return out.reshape(-1)


def input_scales_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{weight name: (module, "weight" or "in_proj")}``: what :func:`input_scales` can
    measure (Linear, Conv2d with groups=1, packed ``in_proj_weight``)."""
    targets: dict[str, tuple[nn.Module, str]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            targets[prefix + "weight"] = (m, "weight")
        elif isinstance(m, nn.MultiheadAttention) and \
                isinstance(getattr(m, "in_proj_weight", None), torch.Tensor):
            targets[prefix + "in_proj_weight"] = (m, "in_proj")
    return targets


def input_scales(model: nn.Module, data: Iterable[Any], layers: Iterable[str] | None = None,
                 *, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """The L2 norm of each input feature of each weight, over calibration batches.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode without gradients (every submodule's mode is restored); a model
        holding an ``nn.TransformerEncoderLayer`` runs with autograd recording (no
        backward), since the layer's inference fast path would not call its Linear modules.
    data : iterable of batches
        As :func:`call_model` takes them (the batches a recovery would use do).
    layers : iterable of str, optional
        Weight names to measure (``"fc1.weight"``, ``"attn.in_proj_weight"``); default
        every Linear / Conv2d weight and packed ``in_proj_weight``.
    max_batches : int, optional
        Stop after this many batches.

    Returns
    -------
    dict of str to tensor
        Per weight name, float64 norms broadcastable to the weight as a matrix
        (rows, in_features * kernel): shape (1, cols), or (3E, E) for ``in_proj_weight``
        (q, k and v rows scaled by their own input). Weights whose module was never
        called are absent.

    Raises
    ------
    RegroupError
        ``data`` yielded no batch, or ``layers`` names a weight the model lacks.
    TypeError, ValueError
        ``max_batches`` is not a positive int or None.
    """
    check_int(max_batches, "max_batches", "input_scales", low=1, optional=True)
    targets = input_scales_targets(model)
    if layers is not None:
        wanted = list(layers)
        missing = [w for w in wanted if w not in targets]
        if missing:
            raise RegroupError(f"input_scales: {type(model).__name__} has no Linear, Conv2d "
                               f"(groups=1) or in_proj weight named {missing[:5]}")
        targets = {w: targets[w] for w in wanted}
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def hook_for(wname: str, kind: str):
        def hook(module, args, kwargs):
            if kind == "in_proj":
                qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")
                                        if k in kwargs]
                if len(qkv) < 3 or not all(isinstance(t, torch.Tensor) for t in qkv):
                    return
                add(wname, torch.stack([_columns_sq(t) for t in qkv[:3]]))
                return
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                return
            add(wname, _conv_columns_sq(module, x) if isinstance(module, nn.Conv2d)
                else _columns_sq(x))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(w, kind), with_kwargs=True)
               for w, (m, kind) in targets.items()]
    fast_path = any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules())
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else None
    seen = 0
    try:
        with training_flags(model), torch.set_grad_enabled(fast_path):
            model.eval()
            for batch in data:
                call_model(model, batch, device)
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise RegroupError("input_scales: the calibration data yielded no batch")
    out = {}
    for w, s in sums.items():
        norms = s.sqrt()
        if targets[w][1] == "in_proj":
            E = norms.shape[1]
            out[w] = norms.repeat_interleave(E, dim=0)          # (3E, E): q|k|v rows
        else:
            out[w] = norms.unsqueeze(0)
    return out


def check_scales(scales: Mapping[str, Any], caller: str) -> dict[str, torch.Tensor]:
    """``scales`` as float64 tensors, refused unless finite and non-negative."""
    if not isinstance(scales, Mapping):
        raise TypeError(f"The 'calibration' parameter of {caller} must be an iterable of "
                        f"batches or a mapping of weight name to input norms (input_scales). "
                        f"Got {type(scales).__name__} instead.")
    out = {}
    for k, v in scales.items():
        t = torch.as_tensor(v).detach().to("cpu", torch.float64)
        if t.dim() != 2 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise RegroupError(f"{caller}: the calibration scales of {k!r} must be a finite, "
                               f"non-negative 2-D tensor (input_scales); got shape "
                               f"{tuple(t.shape)}")
        out[k] = t
    return out
