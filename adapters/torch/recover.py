"""Recovery: distil a block-sparse model back towards its dense teacher, masks fixed.

A block mask keeps fewer weights than the unstructured mask it came from (at the iso
budget 22-32 % of them on real models), so a regrouped model needs a short recovery
before it is used: knowledge distillation from the dense model, training the weights that
the block masks keep and nothing else. :func:`recover` runs it on any regrouped model:

- masked models (after :func:`~regroup.adapters.torch.regroup_model` or
  :meth:`Plan.apply`, fold or runtime mode): torch.nn.utils.prune or torch.ao.pruning hold
  the masks, so a pruned position gets no gradient and stays zero;
- block-sparse models (after :func:`~regroup.adapters.torch.to_block_sparse`): only the
  kept blocks are stored (``module.values``), so there is nothing else to train.

Weights whose zeros nothing holds (layers the plan skipped - depthwise, too small, nearly
dense - when they were pruned by zeroing) get a mask of their nonzeros first, so that
every pruned weight stays pruned (``Recovery.held`` lists them).

The loss compares the student's output with the teacher's on the same inputs: mean
squared error (embeddings, features) or the KL divergence of softened class
distributions (logits), or any callable.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from regroup import RegroupError
from regroup.validation import check_int, check_real

from .calibration import call_model
from .masking import mask_source
from .sparse import BlockSparseConv2d, BlockSparseLinear, BlockSparseMultiheadAttention

__all__ = ["recover", "Recovery", "LOSSES", "main_output"]

LOSSES = ("mse", "kl")

_CALLER = "recover"


@dataclass
class Recovery:
    """What :func:`recover` did.

    Attributes
    ----------
    steps : int
        Optimizer steps taken.
    losses : list of float
        The training loss of every step (before its update).
    seconds : float
    stopped : str or None
        Why it ended before ``steps``: ``"callback"`` or ``"data exhausted"``.
    held : list of str
        Weights with zeros that no mask held (layers the plan skipped, or pruned by
        zeroing): :func:`recover` masked them (torch.nn.utils.prune.custom_from_mask)
        so that they stay pruned.
    """

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None
    held: list[str] = field(default_factory=list)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is compared on: the tensor itself; ``logits`` or
    ``last_hidden_state`` of a Hugging Face output (attribute or key); else the first
    element of a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    if isinstance(out, dict) and out:
        return main_output(next(iter(out.values())))
    raise TypeError(f"{_CALLER}: cannot find the output tensor in a {type(out).__name__}; "
                    "pass output=lambda out: ...")


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, tensor name) of every weight a pruning method may have masked."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append((f"{name}.weight", m, "weight"))
        elif isinstance(m, nn.MultiheadAttention) and \
                isinstance(getattr(m, "in_proj_weight", None), torch.Tensor):
            out.append((f"{name}.in_proj_weight", m, "in_proj_weight"))
    return out


def _masked_layers(model: nn.Module) -> int:
    """How many modules hold a fixed mask (prune / ao parametrization / block-sparse)."""
    blocks = (BlockSparseLinear, BlockSparseConv2d, BlockSparseMultiheadAttention)
    return sum(isinstance(m, blocks) for m in model.modules()) + sum(
        mask_source(m, t) != "zeros" for _, m, t in _weights(model))


def _hold_zeros(model: nn.Module) -> list[str]:
    """Give every weight whose zeros no mask holds (a plan skipped it: too small, dense
    enough, depthwise; or it was pruned by zeroing) a torch.nn.utils.prune mask of its
    nonzeros, so that training keeps them zero. Returns their names."""
    held = []
    for name, m, t in _weights(model):
        w = getattr(m, t)
        if mask_source(m, t) == "zeros" and not bool(w.detach().ne(0).all()):
            prune.custom_from_mask(m, t, w.detach().ne(0))
            held.append(name)
    return held


def _loss_fn(loss: str | Callable, temperature: float) -> Callable:
    if callable(loss):
        return loss
    if loss == "mse":
        return lambda s, t: F.mse_loss(s, t)
    # Hinton et al.: KL of the softened distributions, scaled by T^2 so that gradients
    # keep their size across temperatures.
    return lambda s, t: F.kl_div(F.log_softmax(s / temperature, dim=-1),
                                 F.log_softmax(t / temperature, dim=-1),
                                 log_target=True, reduction="batchmean") * temperature ** 2


def _check(steps: Any, lr: Any, loss: Any, temperature: Any, log_every: Any) -> None:
    check_int(steps, "steps", _CALLER, low=1)
    check_real(lr, "lr", _CALLER, 0, math.inf, low_open=True, high_open=True)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"The 'loss' parameter of {_CALLER} must be one of {LOSSES} or a "
                         f"callable (student, teacher) -> loss. Got {loss!r} instead.")
    check_real(temperature, "temperature", _CALLER, 0, math.inf, low_open=True,
               high_open=True)
    check_int(log_every, "log_every", _CALLER, low=1)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, data: Sequence[Any], *,
                    output: Callable[[Any], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The teacher's compared output on every batch of ``data`` (a list or tuple), in
    eval mode: pass them as ``recover(..., targets=)`` to run the teacher once per batch
    rather than once per step, and once for several students trained on the same data."""
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"The 'data' parameter of teacher_outputs must be a list or tuple "
                        f"of batches. Got {type(data).__name__} instead.")
    ref = next(iter(teacher.parameters()), None)
    device = ref.device if ref is not None else None
    mode = teacher.training
    teacher.eval()
    try:
        extract = output or main_output
        return [extract(call_model(teacher, batch, device)).detach() for batch in data]
    finally:
        teacher.train(mode)


def recover(model: nn.Module, teacher: nn.Module | None, data: Iterable[Any], *,
            steps: int = 200,
            lr: float = 1e-4, loss: str | Callable = "mse", temperature: float = 1.0,
            output: Callable[[Any], torch.Tensor] | None = None,
            optimizer: torch.optim.Optimizer | None = None,
            callback: Callable[[int, float], Any] | None = None, progress: bool = False,
            log_every: int = 20, train_mode: bool = True,
            targets: Sequence[torch.Tensor] | None = None) -> Recovery:
    """Distil ``teacher`` into the regrouped ``model`` for ``steps`` steps, in place.

    Parameters
    ----------
    model : nn.Module
        A regrouped model: masked (regroup_model / Plan.apply, fold or runtime) or
        block-sparse (to_block_sparse). Its block masks stay fixed.
    teacher : nn.Module or None
        The dense model (same inputs, same outputs); run in eval mode without gradients.
        None when ``targets`` are given.
    data : iterable of batches
        Each batch is a tensor (``model(x)``), a tuple (``model(*x)``) or a dict
        (``model(**x)``, e.g. a tokenizer's output); cycled through when it can be
        iterated again (a list, a DataLoader), else used until exhausted.
    steps, lr : int, float
        Optimizer steps, and the learning rate of the default optimizer (Adam over
        the model's trainable parameters).
    loss : {"mse", "kl"} or callable, default="mse"
        "mse" between outputs; "kl" between the softmax of logits at ``temperature``
        (times T^2); a callable ``loss(student_out, teacher_out) -> scalar``.
    output : callable, optional
        Extracts the compared tensor from a model's output (default :func:`main_output`).
    optimizer : torch.optim.Optimizer, optional
        Used instead of the default (then ``lr`` is not used).
    callback : callable, optional
        ``callback(step, loss)`` after each step; returning True stops.
    progress : bool, default=False
        Print a line to stderr every ``log_every`` steps (and at the end).
    train_mode : bool, default=True
        Run the student in train mode (BatchNorm statistics follow the data; dropout on);
        its mode is restored afterwards, as is the teacher's.
    targets : list of tensors, optional
        The teacher's outputs on ``data`` (:func:`teacher_outputs`), one per batch, used
        instead of running the teacher; ``data`` must then be the list or tuple they were
        computed on (same order).

    Returns
    -------
    Recovery

    Raises
    ------
    RegroupError
        Nothing in ``model`` holds a mask (no prune / ao.pruning mask, no block-sparse
        module): training would refill the pruned weights.
    ValueError
        An invalid parameter (named, with what is allowed).
    """
    _check(steps, lr, loss, temperature, log_every)
    if targets is not None:
        if not isinstance(data, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise TypeError(f"With 'targets', the 'data' and 'targets' parameters of {_CALLER} "
                            f"must be lists or tuples (batches and the teacher's outputs on "
                            f"them, in order). Got {type(data).__name__} and "
                            f"{type(targets).__name__} instead.")
        if len(targets) != len(data) or not all(isinstance(t, torch.Tensor) for t in targets):
            raise ValueError(f"The 'targets' parameter of {_CALLER} must hold one tensor per "
                             f"batch of 'data' ({len(data)}). Got {len(targets)} entries "
                             f"instead.")
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"The 'teacher' parameter of {_CALLER} must be an nn.Module (or None "
                        f"with 'targets'). Got {type(teacher).__name__} instead.")
    if _masked_layers(model) == 0:
        raise RegroupError(f"{_CALLER}: no layer of {type(model).__name__} holds a mask "
                           "(torch.nn.utils.prune, torch.ao.pruning or a block-sparse module); "
                           "training it would refill the pruned weights. Apply a plan first "
                           "(regroup_model / Plan.apply) or convert it with to_block_sparse")
    held = _hold_zeros(model)
    extract = output or main_output
    criterion = _loss_fn(loss, float(temperature))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise RegroupError(f"{_CALLER}: {type(model).__name__} has no trainable parameter")
        optimizer = torch.optim.Adam(params, lr=float(lr))
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else None
    modes = (model.training, teacher.training if teacher is not None else False)
    model.train(train_mode)
    if teacher is not None:
        teacher.eval()
    done = Recovery(held=held)
    one_pass = isinstance(data, Iterator)       # a generator is spent after one pass
    t0 = time.perf_counter()
    try:
        while done.steps < steps:
            fresh = False
            for i, batch in enumerate(data):
                fresh = True
                if targets is not None:
                    target = targets[i].to(device)
                else:
                    with torch.no_grad():
                        target = extract(call_model(teacher, batch, device)).detach()
                value = criterion(extract(call_model(model, batch, device)), target)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                done.steps += 1
                done.losses.append(float(value.detach()))
                if progress and (done.steps % log_every == 0 or done.steps == steps):
                    print(f"recover: step {done.steps}/{steps} loss {done.losses[-1]:.6g} "
                          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
                if callback is not None and callback(done.steps, done.losses[-1]) is True:
                    done.stopped = "callback"
                    return done
                if done.steps >= steps:
                    return done
            if not fresh and not done.steps:
                raise ValueError(f"The 'data' parameter of {_CALLER} yielded no batch")
            if not fresh or one_pass:
                done.stopped = "data exhausted"
                return done
    finally:
        done.seconds = time.perf_counter() - t0
        model.train(modes[0])
        if teacher is not None:
            teacher.train(modes[1])
    return done
