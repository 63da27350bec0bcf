"""Dynamic sparse training on regrouped blocks: :class:`RegroupDST`, a torch.ao.pruning
sparsifier doing RigL-style drop and grow on the units of block layouts.

RigL (Evci et al., ICML 2020) drops the smallest weights and grows those with the
largest dense gradient every ``T`` steps; DSB (NeurIPS 2022) does it on blocks that it
re-clusters from scratch at every update. Here each layer holds a block layout
(:class:`regroup.LayerResult`, ``grid`` blocks or ``shuffled`` tiles), and an update
(steps 1 and 2 are :func:`regroup.dst.update_layout`, torch-free)

1. drops the ``drop_count(K, d_t)`` kept units with the smallest ``||W_u||_F^2`` and
   grows as many with the largest ``||G_u||_F^2`` (``G`` the dense gradient of the
   weight, collected by a hook armed on the step before the update), through
   :func:`regroup.dst.drop_grow`. A shuffled panel's columns that it does not keep are
   grouped into candidate tiles by their gradient (:func:`regroup.dst.layout_units` with
   ``rank=G``), so a grown tile gathers the columns the gradient asks for;
2. every ``relayout_every`` updates, tries a warm re-layout (:func:`regroup.dst.relayout`,
   the search of :func:`regroup.regroup_pattern` with ``init=``), scored on ``w**2`` for
   the kept weights and a scaled ``G**2`` elsewhere, and keeps it only if it scores more
   and the whole update still removes at most ``d_t`` of the kept ``w**2`` mass;
3. zeroes, in the weight and in the optimizer's state, every position that is not kept
   both before and after: new positions start at 0 (RigL), dropped ones stay at 0.

Execution is masked by default (a ``FakeSparsity`` parametrization, as every
torch.ao.pruning sparsifier); :meth:`RegroupDST.convert` swaps the layers for block-sparse
modules at the end of training. With ``execution="block"`` the layers are block-sparse
modules from :meth:`~RegroupDST.prepare` on (forward and backward on the kept blocks
only): an update moves the module to its new layout in place (:meth:`BlockCore.set_layout
<regroup.adapters.torch.sparse.BlockCore.set_layout>`), the same ``values`` Parameter
and its optimizer state remapped through the dense positions, and the dense gradient of
the armed step is ``dL/dW`` computed from the layer's input and output gradient.
"""
from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

import regroup
from regroup import RegroupError
from regroup.blocks import Layout, layout_mask
from regroup.dst import (DISTRIBUTIONS, drop_fraction, layer_densities, layout_units,
                         make_units, unit_scores, units_for_density, units_layout,
                         update_layout)
from regroup.options import RegroupOptions
from regroup.result import LayerResult
from regroup.validation import check_block, check_choice, check_int, check_real

from .plan import Plan, kept_dense, on_device_of, to_block_sparse
from .sparse import BACKENDS, BlockSparseConv2d, BlockSparseLinear, set_backend

__all__ = ["RegroupDST", "RELAYOUT_ROUNDS"]

#: Refinement rounds of a re-layout by default. One round (measured with the |w|
#: re-layout scores of the time): on digits (10 paired seeds) the accuracy was the same
#: as with three (97.39 vs 97.28, paired p = 0.50) for 13 %
#: less mask-update time, and on MiniLM's 1536x384 FFN weights one round kept 0.7543
#: of the scores against three's 0.7552 in half the time (benchmarks/README.md).
RELAYOUT_ROUNDS = 1

FORMATS = ("grid", "shuffled")
EXECUTIONS = ("masked", "block")
INITS = ("random", "magnitude")


def _globs(exclude: Any, caller: str) -> tuple[str, ...]:
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not isinstance(exclude, (tuple, list)) or \
            not all(isinstance(g, str) for g in exclude):
        raise TypeError(f"The 'exclude' parameter of {caller} must be a glob or a sequence "
                        f"of globs over weight names ('fc1.weight', 'head.*'). Got "
                        f"{exclude!r} instead.")
    return tuple(exclude)


def _matrix(t: torch.Tensor, *, exact: bool = False) -> np.ndarray:
    """A weight-shaped tensor as a float64 (out, -1) numpy array; ``exact``: float32
    stays float32 (no copy on the CPU; the core converts what it reads)."""
    keep = exact and t.dtype in (torch.float32, torch.float64)
    return t.detach().reshape(t.shape[0], -1).to(
        "cpu", t.dtype if keep else torch.float64).numpy()


def _fake_sparsity(module: nn.Module, name: str) -> FakeSparsity:
    for p in module.parametrizations[name]:
        if isinstance(p, FakeSparsity):
            return p
    raise RegroupError(f"{type(module).__name__}.{name} has no FakeSparsity "
                       "parametrization (was the model prepared by this sparsifier?)")


class RegroupDST(BaseSparsifier):
    """Dynamic sparse training with block layouts: a torch.ao.pruning sparsifier.

    Call :meth:`prepare` once, then :meth:`step` after every ``optimizer.step()``. Every
    ``T`` steps while ``t < T_end`` it updates each layer's mask: RigL's drop and grow on
    whole units of the layer's block layout, then (every ``relayout_every`` updates) a
    warm re-layout. Execution is masked (``execution="masked"``; :meth:`convert` gives the
    block-sparse model) or block-sparse from :meth:`prepare` on (``execution="block"``).

    Parameters
    ----------
    sparsity : float in [0, 1), default=0.9
        Share of the selected layers' weights that is pruned, over all of them.
    distribution : {"erk", "uniform"}, default="erk"
        How the kept weights are spread over the layers
        (:func:`regroup.dst.layer_densities`; ERK over the selected layers).
    block : int or (int, int), default=16
        The unit ``br x bc`` (rows are output channels; a conv's columns are its
        ``in * kh * kw`` inputs).
    format : {"shuffled", "grid"}, default="shuffled"
        Units are panel tiles (each row panel orders its own columns) or blocks of one
        permuted grid.
    T : int >= 1, default=100
        Steps between mask updates.
    T_end : int >= T
        No update at or after step ``T_end`` (RigL uses 75 % of training).
    alpha : float in [0, 1], default=0.3
        Drop fraction at step 0; ``d_t = alpha / 2 * (1 + cos(pi t / T_end))``.
    relayout_every : int >= 0 or None, default=None
        Try a warm re-layout every that many updates; 0 or None: never (the orders stay
        those of the initial layout).
    warm_rounds : int >= 1, optional
        Refinement rounds of a re-layout (default :data:`RELAYOUT_ROUNDS`).
    optimizer : torch.optim.Optimizer, optional
        Its per-parameter state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, any
        tensor of the weight's shape) is zeroed wherever the weight is: at grown and
        dropped positions. It must hold every selected weight. Without it the caller
        keeps stale momentum at new positions. Required with ``execution="block"``.
    exclude : glob or sequence of globs, default=()
        Weight names never sparsified (``"fc1.weight"``, ``"classifier.*"``), e.g. the
        first and last layers.
    seed : int >= 0, default=0
        The random initial kept sets and the re-layouts.
    init : {"random", "magnitude"}, default="random"
        The initial layouts. "random": identity orders and random kept units (training
        from scratch: i.i.d. weights have no order better than another). "magnitude":
        from the weights the model holds (fine-tuning a pretrained model): the units of
        most ``|w|`` in the identity order for element-wise layers and when
        ``relayout_every`` is 0 (orders never move: top-k weights, RigL from magnitude
        pruning), else the better of that and regroup's layout of ``|w|``
        (:func:`regroup.regroup_pattern`, method "auto", as many units);
        ``results[name].method`` says which ("magnitude identity" / "magnitude auto"),
        and ``results[name].metrics["init_note"]`` why regroup's was not taken.
    execution : {"masked", "block"}, default="masked"
        "masked": each layer keeps its dense weight under a ``FakeSparsity`` mask.
        "block": :meth:`prepare` swaps each layer for a :class:`BlockSparseLinear` /
        :class:`BlockSparseConv2d` of its initial layout, so forward and backward run on
        the kept blocks only (see Notes); the layers listed in :attr:`masked` run masked.

    Attributes
    ----------
    results : dict of str to LayerResult
        Per weight name, the current layout (original coordinates); ``results[n].mask``
        is the layer's mask.
    densities : dict of str to float
        The density each layer was given (its kept units may round it up).
    element_wise : dict of str to str
        The layers smaller than a block on one side, with why: their units are single
        weights (element-wise RigL, as DSB's code trains what it cannot block), they are
        never re-laid out, and :meth:`convert` leaves them dense-masked.
    masked : dict of str to str
        With ``execution="block"``, the layers that run masked all the same, with why:
        the element-wise ones, a layer whose parent reads its weight directly
        (``nn.MultiheadAttention.out_proj``, a ``TransformerEncoderLayer`` whose fused
        path may run), a convolution with string padding or a non-zero padding mode, a
        model that is itself the layer. Empty with ``execution="masked"``.
    history : list of dict
        One record per layer per update: ``t``, ``update`` (1, 2, ...), ``layer``,
        ``drop_fraction``, ``kept`` (units), ``dropped`` and ``grown`` (units; a unit
        dropped and grown again counts in both and keeps its weights, as in RigL),
        ``relayout`` (None: not tried; True / False: accepted or not),
        ``relayout_note`` (why not, or the gain), ``churn`` (share of the kept ``w**2``
        mass the update removed, at most ``drop_fraction``), ``seconds``; and
        ``skipped`` (a reason, or None).

    Notes
    -----
    Each layer keeps ``units_for_density(units, density)`` units. With ``init="random"``
    its initial layout has identity orders and a random kept set (seeded): at
    initialisation the weights are i.i.d., so no order is better than another, and the
    re-layouts find orders once training gives the weights structure; with
    ``init="magnitude"`` it is chosen on the weights the model holds (see ``init``).
    Weights outside the mask are zeroed.

    The dense gradient is collected by a hook on the output of each layer's
    ``FakeSparsity`` (``dL/dW`` before masking), armed only on the step before an
    update: every forward/backward of that step adds to it (gradient accumulation
    works), and the other steps pay nothing.

    With ``execution="block"`` the weight of a block-sparse layer is its ``values``
    Parameter (n_blocks, br, bc), built at :meth:`prepare` from the masked weight: the
    optimizer's reference to the weight is replaced by ``values`` (its state gathered
    onto the kept blocks), the bias stays the same Parameter: ``optimizer`` is required
    (its state follows the blocks, which change storage slots at every update). A layer
    keeps its unit count, so ``values`` keeps its shape and object through every update;
    an update moves the module to its new layout in place (:meth:`BlockCore.set_layout
    <regroup.adapters.torch.sparse.BlockCore.set_layout>`): ``values``, its ``grad`` and
    every values-shaped optimizer state tensor are remapped through the dense positions
    (the BSR product needs the blocks in row-major order, so a kept unit may move to
    another slot), a position kept before and after keeps its value and state, the
    others are 0, exactly as in the masked execution. The dense gradient of the armed
    step is ``dL/dW`` from the layer's input and its output's gradient (a forward hook
    and a tensor hook: ``g^T x`` for a Linear, ``torch.nn.grad.conv2d_weight`` for a
    convolution). The two executions train alike up to float rounding (same masks,
    layouts and history). The block modules start with backend "auto" (the first call
    of each input class times the paths);
    :func:`~regroup.adapters.torch.set_backend` fixes one.

    >>> sparsifier = RegroupDST(0.9, block=16, T=100, T_end=7500, optimizer=opt)
    >>> sparsifier.prepare(model)
    >>> for x, y in data:
    ...     loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    ...     sparsifier.step()
    >>> sparsifier.convert(model)          # BlockSparseLinear / BlockSparseConv2d

    Block-sparse training, the optimizer passed so that it follows the new parameters:

    >>> sparsifier = RegroupDST(0.9, block=16, T=100, T_end=7500, optimizer=opt,
    ...                         execution="block")
    >>> sparsifier.prepare(model)          # model now holds BlockSparseLinear / ...Conv2d
    """

    def __init__(self, sparsity: float = 0.9, *, distribution: str = "erk",
                 block: int | tuple[int, int] = 16, format: str = "shuffled", T: int = 100,
                 T_end: int, alpha: float = 0.3, relayout_every: int | None = None,
                 warm_rounds: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 exclude: str | Sequence[str] = (), seed: int = 0,
                 execution: str = "masked", init: str = "random") -> None:
        caller = "RegroupDST"
        self.sparsity = check_real(sparsity, "sparsity", caller, 0, 1, high_open=True)
        self.distribution = check_choice(distribution, "distribution", caller, DISTRIBUTIONS)
        self.block = check_block(block, caller)
        self.format = check_choice(format, "format", caller, FORMATS)
        self.T = check_int(T, "T", caller, low=1)
        self.T_end = check_int(T_end, "T_end", caller, low=self.T)
        self.alpha = check_real(alpha, "alpha", caller, 0, 1)
        self.relayout_every = check_int(relayout_every, "relayout_every", caller, low=0,
                                        optional=True) or 0
        self.warm_rounds = check_int(warm_rounds, "warm_rounds", caller, low=1,
                                     optional=True) or RELAYOUT_ROUNDS
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"The 'optimizer' parameter of {caller} must be a "
                            f"torch.optim.Optimizer or None. Got {type(optimizer).__name__} "
                            "instead.")
        self.optimizer = optimizer
        self.exclude = _globs(exclude, caller)
        self.seed = check_int(seed, "seed", caller, low=0)
        self.execution = check_choice(execution, "execution", caller, EXECUTIONS)
        if execution == "block" and optimizer is None:
            # values move between storage slots at every update: an optimizer the
            # sparsifier does not hold would keep its state in the old slots.
            raise ValueError(f"The 'optimizer' parameter of {caller} must be a "
                             "torch.optim.Optimizer with execution='block' (its state follows "
                             "the blocks as they move). Got None instead.")
        self.init = check_choice(init, "init", caller, INITS)
        super().__init__(defaults={})
        self.results: dict[str, LayerResult] = {}
        self.densities: dict[str, float] = {}
        self.element_wise: dict[str, str] = {}
        self.history: list[dict[str, Any]] = []
        self.masked: dict[str, str] = {}
        self._block: dict[str, BlockSparseLinear | BlockSparseConv2d] = {}
        self._t = 0                   # step() calls so far
        self._updates = 0             # mask updates so far
        self._armed = False
        self._grads: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._converted = False
        self.convert_report: dict[str, str] = {}
        self._now: dict[str, Any] = {}   # the update in progress (t, d_t, relayout)

    # -- selection -------------------------------------------------------------------------
    def _eligible(self, model: nn.Module) -> dict[str, nn.Module]:
        """Weight name -> module, for every Linear and groups == 1 Conv2d."""
        return {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules()
                if isinstance(m, nn.Linear)
                or (isinstance(m, nn.Conv2d) and m.groups == 1)}

    def _select(self, model: nn.Module, config: Any, caller: str) -> list[str]:
        eligible = self._eligible(model)
        if config is None:
            names = list(eligible)
        else:
            if isinstance(config, (str, Mapping)) or not isinstance(config, Sequence):
                raise TypeError(f"The 'config' parameter of {caller} must be None or a list "
                                "of dicts like {'tensor_fqn': 'fc1.weight'}. Got "
                                f"{type(config).__name__} instead.")
            names = []
            for entry in config:
                fqn = entry.get("tensor_fqn") if isinstance(entry, Mapping) else None
                if not isinstance(fqn, str) or set(entry) != {"tensor_fqn"}:
                    raise ValueError(f"The 'config' parameter of {caller} must list dicts "
                                     "with one key, 'tensor_fqn' (layers share the "
                                     f"sparsifier's settings). Got {entry!r} instead.")
                if fqn not in eligible:
                    raise ValueError(f"The 'config' parameter of {caller} must name weights "
                                     "of Linear or Conv2d (groups=1) modules of the model. "
                                     f"Got {fqn!r} instead.")
                if fqn in names:
                    raise ValueError(f"The 'config' parameter of {caller} names {fqn!r} "
                                     "twice.")
                names.append(fqn)
        names = [n for n in names
                 if not any(fnmatch.fnmatchcase(n, g) for g in self.exclude)]
        if not names:
            raise RegroupError(f"{caller}: no layer to sparsify in {type(model).__name__} "
                               f"(Linear / Conv2d with groups=1, minus exclude="
                               f"{list(self.exclude)})")
        for n in names:
            if parametrize.is_parametrized(eligible[n], "weight"):
                raise RegroupError(f"{caller}: {n} is already parametrized; remove its "
                                   "parametrizations (or prepare a fresh model)")
        return names

    def _unit_block(self, shape2d: tuple[int, int]) -> tuple[tuple[int, int], str]:
        """The unit and format of a layer: the sparsifier's, or single weights in the grid
        format (element-wise RigL, as DSB's code trains layers it cannot block) when the
        block does not fit the layer."""
        br, bc = self.block
        if br > shape2d[0] or bc > shape2d[1]:
            return (1, 1), "grid"
        return self.block, self.format

    # -- prepare ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None = None) -> None:
        """Register the masks on ``model`` (in place) and draw the initial layouts.

        ``config`` None selects every ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1``
        whose weight name no ``exclude`` glob matches; a list of ``{"tensor_fqn":
        name}`` selects those (minus ``exclude``). Everything is checked before the
        model is touched. With ``execution="block"`` the layers that can are then
        replaced by block-sparse modules (and their weights, in ``optimizer``, by the
        modules' ``values``; see the class Notes).

        Raises
        ------
        RegroupError
            Nothing to sparsify, a weight already parametrized, or (with ``optimizer``)
            a selected weight the optimizer does not hold.
        ValueError, TypeError
            A bad config.
        """
        caller = "RegroupDST.prepare"
        if self.groups:
            raise RegroupError(f"{caller}: this sparsifier is already prepared; make a new "
                               "one for another model")
        names = self._select(model, config, caller)
        modules = self._eligible(model)
        if self.optimizer is not None:
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            lost = [n for n in names if id(modules[n].weight) not in held]
            if lost:
                raise RegroupError(f"{caller}: the optimizer does not hold the weights of "
                                   f"{', '.join(lost[:8])}; pass the optimizer of this "
                                   "model (its state is zeroed at new positions)")
        shapes = [tuple(modules[n].weight.shape) for n in names]
        dens = layer_densities(shapes, self.sparsity, distribution=self.distribution,
                               caller=caller)
        rng = np.random.default_rng(self.seed)
        layouts = {}
        for n, shape, d in zip(names, shapes, dens):
            shape2d = (shape[0], math.prod(shape[1:]))
            unit, fmt = self._unit_block(shape2d)
            if unit != self.block:
                self.element_wise[n] = (f"{shape2d[0]}x{shape2d[1]} is smaller than a "
                                        f"{self.block[0]}x{self.block[1]} block: trained "
                                        "element-wise (RigL), never re-laid out")
            units = make_units(shape2d, unit, fmt)
            k = units_for_density(units, float(d))
            if self.init == "magnitude":
                layouts[n] = self._magnitude_layout(n, shape, _matrix(modules[n].weight),
                                                    units, k)
            else:
                kept = np.zeros(units.n_units, bool)
                kept[rng.choice(units.n_units, size=k, replace=False)] = True
                kept = kept.reshape(units.table_shape)
                layouts[n] = self._result(n, shape, units, kept,
                                          np.zeros(units.table_shape), "identity")
            self.densities[n] = float(d)
        # Block execution: every block-sparse module is built before the model is touched.
        built = self._build_blocks(model, names, modules, layouts) \
            if self.execution == "block" else {}
        super().prepare(model, [{"tensor_fqn": n} for n in names if n not in built])
        for group in self.groups:
            fqn = group["tensor_fqn"]
            module, name = group["module"], group["tensor_name"]
            self.results[fqn] = layouts[fqn]
            self._set_mask(module, name, None, layouts[fqn].mask)
            self._handles.append(_fake_sparsity(module, name).register_forward_hook(
                self._grad_hook(fqn)))
        for fqn, new in built.items():
            mod_name = fqn.rpartition(".")[0]
            old = modules[fqn]
            parent, _, leaf = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            self._swap_param(old.weight, new)
            self.results[fqn] = layouts[fqn]
            self._block[fqn] = new
            self.groups.append({"tensor_fqn": fqn, "module": new, "module_fqn": mod_name,
                                "tensor_name": "weight"})
            self.state[fqn]["mask"] = torch.from_numpy(layouts[fqn].mask.copy())
            self._handles.append(new.register_forward_hook(self._block_grad_hook(fqn)))
        # Updates (and history records) follow the layer order, whatever the execution.
        self.groups.sort(key=lambda g: names.index(g["tensor_fqn"]))
        self._arm()

    def _build_blocks(self, model: nn.Module, names: list[str],
                      modules: Mapping[str, nn.Module], layouts: Mapping[str, LayerResult]
                      ) -> dict[str, BlockSparseLinear | BlockSparseConv2d]:
        """The block-sparse module of each selected layer that can run as one, built from
        its initial layout; the others are listed in :attr:`masked` with why."""
        # A parent that reads the weight directly (MultiheadAttention's out_proj, the
        # fused TransformerEncoderLayer path) needs the module it has.
        mods = dict(model.named_modules())
        in_mha = {n for n in names if isinstance(
            mods.get(n.rpartition(".")[0].rpartition(".")[0]), nn.MultiheadAttention)}
        direct = kept_dense(mods, [n for n in names if n not in in_mha])
        # A weight tied to another module's parameter would be untied by the swap.
        holders: dict[int, int] = {}
        for m in mods.values():
            for p in m.parameters(recurse=False):
                holders[id(p)] = holders.get(id(p), 0) + 1
        built = {}
        for n in names:
            module = modules[n]
            if n in self.element_wise:
                why = self.element_wise[n]
            elif n == "weight":
                why = "the model itself is the layer (only submodules are replaced)"
            elif n in in_mha:
                why = "nn.MultiheadAttention reads out_proj.weight directly"
            elif n in direct:
                why = direct[n]
            elif holders.get(id(module.weight), 0) > 1:
                why = "its weight is shared (tied) with another module"
            elif isinstance(module, nn.Conv2d) and (isinstance(module.padding, str)
                                                    or module.padding_mode != "zeros"):
                why = "BlockSparseConv2d needs numeric padding and zero padding mode"
            else:
                why = None
            if why is not None:
                self.masked[n] = why
                continue
            if isinstance(module, nn.Linear):
                new = BlockSparseLinear(layouts[n], module.weight.detach(), None)
            else:
                new = BlockSparseConv2d(layouts[n], module)
            new = on_device_of(module, new)
            new.bias = module.bias      # the same Parameter: the optimizer holds it
            built[n] = new
        return built

    def _swap_param(self, old: nn.Parameter, new: BlockSparseLinear | BlockSparseConv2d
                    ) -> None:
        """Put ``new.values`` in the optimizer where ``old`` (the dense weight) was, its
        state (weight-shaped tensors) gathered onto the kept blocks."""
        if self.optimizer is None:
            return
        core = new.core
        for g in self.optimizer.param_groups:
            g["params"][:] = [core.values if p is old else p for p in g["params"]]
        state = self.optimizer.state.pop(old, None)
        if state:
            self.optimizer.state[core.values] = {
                k: core.from_dense(v.detach().reshape(core.shape)).contiguous()
                if isinstance(v, torch.Tensor) and v.shape == old.shape else v
                for k, v in state.items()}

    def _block_grad_hook(self, fqn: str) -> Any:
        """A forward hook on the block-sparse module of ``fqn``: while armed, ``dL/dW`` of
        the dense weight (from the input and the output's gradient) is added to
        ``_grads[fqn]``."""
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if not (self._armed and out.requires_grad):
                return
            x = inputs[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                # In the weight's dtype, as the masked execution's gradient (autocast).
                dtype = module.core.values.dtype
                g, xd = g.detach().to(dtype), x.to(dtype)
                if isinstance(module, BlockSparseConv2d):
                    dw = torch.nn.grad.conv2d_weight(
                        xd, (module.out_channels, module.in_channels, *module.kernel_size),
                        g, module.stride, module.padding, module.dilation)
                else:       # Linear: g^T x over every leading (batch, sequence) dim
                    dw = g.reshape(-1, g.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
                prev = self._grads.get(fqn)
                self._grads[fqn] = dw if prev is None else prev + dw
            out.register_hook(on_grad)
        return hook

    def _grad_hook(self, fqn: str) -> Any:
        """A forward hook on the FakeSparsity of ``fqn``: while armed, the gradient of
        its output (the weight before masking) is added to ``_grads[fqn]``."""
        def on_grad(g: torch.Tensor) -> None:
            g = g.detach()
            prev = self._grads.get(fqn)
            self._grads[fqn] = g.clone() if prev is None else prev + g

        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            if self._armed and out.requires_grad:
                out.register_hook(on_grad)
        return hook

    def _arm(self) -> None:
        nxt = self._t + 1
        self._armed = not self._converted and nxt % self.T == 0 and nxt < self.T_end
        if not self._armed:
            self._grads.clear()

    def _result(self, fqn: str, shape: tuple[int, ...], units: Any, kept: np.ndarray,
                mass: np.ndarray, method: str, metrics: dict | None = None) -> LayerResult:
        return self._layout_result(fqn, shape, units_layout(units, kept, mass), method,
                                   metrics)

    def _layout_result(self, fqn: str, shape: tuple[int, ...], lay: Layout, method: str,
                       metrics: dict | None = None, *, mask: np.ndarray | None = None
                       ) -> LayerResult:
        """``lay`` as the LayerResult of ``fqn``; ``mask``: its mask, when known."""
        return LayerResult(
            name=fqn, shape=tuple(shape),
            mask=(layout_mask(lay) if mask is None else mask).reshape(shape),
            row_perm=np.array(lay.row_perm), col_perm=None if lay.col_perm is None
            else np.array(lay.col_perm), panel_cols=lay.panel_cols,
            block_shape=tuple(lay.block_shape), format=lay.format, method=method,
            seed=self.seed, metrics={"chosen": "dst", "kept_blocks": int(lay.kept_blocks),
                                     "kept_area": int(lay.kept_area), **(metrics or {})})

    def _magnitude_layout(self, fqn: str, shape: tuple[int, ...], W: np.ndarray, units: Any,
                          k: int) -> LayerResult:
        """The initial layout of ``init="magnitude"``: the ``k`` units of most ``|w|`` in
        the identity order, or regroup's layout of ``|w|`` keeping ``k`` units when it
        keeps more (only where orders can move: re-layouts on, not element-wise)."""
        mass = unit_scores(W, units, power=1)
        kept = np.zeros(units.n_units, bool)
        kept[np.argsort(-mass.reshape(-1), kind="stable")[:k]] = True
        best = self._result(fqn, shape, units, kept.reshape(units.table_shape), mass,
                            "magnitude identity")
        if not self.relayout_every or fqn in self.element_wise:
            return best
        opts = RegroupOptions(block=units.block_shape, format=units.format, method="auto",
                              budget=f"blocks={k}", objective="magnitude", seed=self.seed)
        try:
            out = regroup.regroup_pattern(regroup.from_array(np.abs(W), name=fqn),
                                          options=opts)
        except RegroupError as exc:      # e.g. fewer nonzero weights than k units hold
            why = f"regroup's layout failed: {exc}"
        else:
            r_units, r_kept = layout_units(out)
            r_mass = unit_scores(W, r_units, power=1)
            mine, theirs = mass[kept.reshape(mass.shape)].sum(), r_mass[r_kept].sum()
            if int(r_kept.sum()) != k:
                why = f"regroup's layout keeps {int(r_kept.sum())} units, not {k}"
            elif not theirs > mine:
                why = f"regroup's layout keeps no more |w| ({theirs:.6g} <= {mine:.6g})"
            else:
                return self._result(fqn, shape, r_units, r_kept, r_mass, "magnitude auto")
        best.metrics["init_note"] = why
        return best

    def _set_mask(self, module: nn.Module, name: str, old: np.ndarray | None,
                  new: np.ndarray) -> None:
        """Install mask ``new``; zero the weight and its optimizer state everywhere but
        the positions kept in both ``old`` and ``new`` (all of ``new`` when ``old`` is
        None, at prepare)."""
        fake = _fake_sparsity(module, name)
        original = module.parametrizations[name].original
        new_t = torch.from_numpy(np.ascontiguousarray(new)).reshape(original.shape)
        keep = new_t if old is None else \
            new_t & torch.from_numpy(np.ascontiguousarray(old)).reshape(original.shape)
        keep = keep.to(original.device)
        with torch.no_grad():
            fake.mask.copy_(new_t.to(device=fake.mask.device, dtype=fake.mask.dtype))
            original.masked_fill_(~keep, 0)
            state = self.optimizer.state.get(original, {}) if self.optimizer else {}
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == original.shape:
                    v.masked_fill_(~keep.to(v.device), 0)

    def _set_block(self, fqn: str, module: BlockSparseLinear | BlockSparseConv2d,
                   new: LayerResult) -> None:
        """Move the block-sparse module of ``fqn`` to layout ``new`` in place: its values
        (the same Parameter) and their optimizer state (every values-shaped tensor)
        follow their dense positions; positions new to the mask start at 0."""
        values = module.core.values
        state = self.optimizer.state.get(values, {}) if self.optimizer else {}
        module.core.set_layout(new, tuple(
            v for v in state.values()
            if isinstance(v, torch.Tensor) and v.shape == values.shape))
        self.state[fqn]["mask"] = torch.from_numpy(new.mask.copy())

    # -- step ------------------------------------------------------------------------------
    def step(self) -> None:  # type: ignore[override]
        """Count one training step; on every ``T``-th step before ``T_end``, update the
        masks (call it after ``optimizer.step()``). With ``enable_mask_update`` False
        the steps are counted and the updates skipped (the schedule stays in steps)."""
        if self._converted:
            raise RegroupError("RegroupDST.step: the model was converted; the masks are "
                               "final")
        if not self.groups:
            raise RegroupError("RegroupDST.step: call prepare(model) first")
        self._t += 1
        t = self._t
        if t % self.T == 0 and t < self.T_end and self.enable_mask_update:
            self._updates += 1
            self._now = {"t": t, "d": drop_fraction(t, self.T_end, self.alpha),
                         "relayout": bool(self.relayout_every)
                         and self._updates % self.relayout_every == 0}
            with torch.no_grad():
                for config in self.groups:
                    self.update_mask(**config)
            self._grads.clear()
        self._arm()

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """One layer's mask update (called by :meth:`step` on update steps)."""
        fqn = kwargs["tensor_fqn"]
        t0 = time.perf_counter()
        t, d = self._now["t"], self._now["d"]
        res = self.results[fqn]
        rec: dict[str, Any] = {"t": t, "update": self._updates, "layer": fqn,
                               "drop_fraction": d, "kept": int(res.metrics["kept_blocks"]),
                               "dropped": 0, "grown": 0, "relayout": None,
                               "relayout_note": None, "churn": 0.0, "seconds": 0.0,
                               "skipped": None}
        grad = self._grads.get(fqn)
        if grad is None:
            rec["skipped"] = ("no gradient: no backward reached this layer on the step "
                              "before the update")
            rec["seconds"] = time.perf_counter() - t0
            self.history.append(rec)
            return
        block = self._block.get(fqn)
        W = _matrix(block.core.to_dense(block.core.values) if block is not None else
                    module.parametrizations[tensor_name].original, exact=True)
        relayout = self._now["relayout"] and fqn not in self.element_wise
        upd = update_layout(W, _matrix(grad, exact=True), res, d, relayout=relayout,
                            rounds=self.warm_rounds)
        new_res = self._layout_result(
            fqn, res.shape, upd.layout, res.method,
            {"relayout_rounds": self.warm_rounds} if upd.relayout else None, mask=upd.mask)
        if block is not None:
            self._set_block(fqn, block, new_res)
        else:
            self._set_mask(module, tensor_name, res.mask2d, upd.mask)
        self.results[fqn] = new_res
        rec.update(dropped=upd.dropped, grown=upd.grown, relayout=upd.relayout,
                   relayout_note=upd.note, churn=upd.churn,
                   seconds=time.perf_counter() - t0)
        self.history.append(rec)

    # -- state -----------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "distribution": self.distribution,
                "block": list(self.block), "format": self.format, "T": self.T,
                "T_end": self.T_end, "alpha": self.alpha,
                "relayout_every": self.relayout_every, "seed": self.seed,
                "execution": self.execution}

    def state_dict(self) -> dict[str, Any]:
        """The masks, the layouts, the step counters and the history: tensors and
        plain Python values only (loads with ``torch.load(weights_only=True)``)."""
        sd = super().state_dict()
        sd["state"] = {fqn: {"mask": torch.from_numpy(r.mask.copy())}
                       for fqn, r in self.results.items()}
        layouts = {}
        for fqn, r in self.results.items():
            layouts[fqn] = {
                "shape": list(r.shape), "block_shape": list(r.block_shape),
                "format": r.format, "method": r.method,
                "row_perm": torch.from_numpy(np.asarray(r.row_perm, np.int64)),
                "col_perm": None if r.col_perm is None else
                torch.from_numpy(np.asarray(r.col_perm, np.int64)),
                "panel_cols": None if r.panel_cols is None else
                [torch.from_numpy(np.asarray(c, np.int64)) for c in r.panel_cols],
                "kept_blocks": int(r.metrics["kept_blocks"])}
        sd["dst"] = {"settings": self._settings(), "t": self._t, "updates": self._updates,
                     "densities": dict(self.densities), "layouts": layouts,
                     "masked": sorted(self.masked),
                     "history": [dict(h) for h in self.history]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` into this sparsifier, prepared on a model with the
        same layers and settings: masks (into the same mask tensors), layouts, step
        counters and history. The weights come with the model's own state dict, loaded
        with ``strict=False``: torch.ao's ``FakeSparsity`` leaves its mask out of it.

        >>> sparsifier.prepare(model)
        >>> model.load_state_dict(saved_model_state, strict=False)
        >>> sparsifier.load_state_dict(saved_sparsifier_state)

        With ``execution="block"``, :meth:`prepare` a fresh dense model of the architecture
        with a sparsifier of the same settings and optimizer construction, then load this
        state *first*: each block-sparse module is moved to its saved layout in place
        (:meth:`BlockCore.set_layout <regroup.adapters.torch.sparse.BlockCore.set_layout>`),
        so that the model's state dict (whose block layout buffers must then match: a
        block-sparse module refuses another layout) and the optimizer's (``values`` has
        the same shape and storage order) load next.

        >>> sparsifier.prepare(model)
        >>> sparsifier.load_state_dict(saved_sparsifier_state)
        >>> model.load_state_dict(saved_model_state, strict=False)
        >>> optimizer.load_state_dict(saved_optimizer_state)

        Raises
        ------
        RegroupError
            Not prepared, other settings (``execution`` included) or layers, layers that
            run masked here and block-sparse there (or the reverse), a layout that fails
            :func:`regroup.check_layout` or does not fit its block-sparse module; nothing
            is changed then.
        """
        caller = "RegroupDST.load_state_dict"
        if not self.groups:
            raise RegroupError(f"{caller}: call prepare(model) first, with the same layers")
        dst = state_dict.get("dst") if isinstance(state_dict, Mapping) else None
        if not isinstance(dst, Mapping):
            raise RegroupError(f"{caller}: not a RegroupDST state dict (no 'dst' entry)")
        # (states saved before the execution option were masked)
        saved = {"execution": "masked", **dst["settings"]}
        if saved != self._settings():
            diff = {k: v for k, v in saved.items() if self._settings().get(k) != v}
            raise RegroupError(f"{caller}: the state was saved with other settings: {diff}")
        if set(dst["layouts"]) != set(self.results):
            raise RegroupError(f"{caller}: the state has layers {sorted(dst['layouts'])}, "
                               f"this sparsifier {sorted(self.results)}")
        if sorted(dst.get("masked", [])) != sorted(self.masked):
            raise RegroupError(f"{caller}: the state runs {sorted(dst.get('masked', []))} "
                               f"masked, this sparsifier {sorted(self.masked)} (another "
                               "model structure?)")
        restored = {}
        for fqn, lay in dst["layouts"].items():
            shape = tuple(lay["shape"])
            if shape != tuple(self.results[fqn].shape):
                raise RegroupError(f"{caller}: {fqn} has shape {shape} in the state, "
                                   f"{tuple(self.results[fqn].shape)} in the model")
            mask = state_dict["state"][fqn]["mask"].cpu().numpy().astype(bool)
            r = LayerResult(
                name=fqn, shape=shape, mask=mask.reshape(shape),
                row_perm=lay["row_perm"].numpy().astype(np.intp),
                col_perm=None if lay["col_perm"] is None else
                lay["col_perm"].numpy().astype(np.intp),
                panel_cols=None if lay["panel_cols"] is None else
                tuple(c.numpy().astype(np.intp) for c in lay["panel_cols"]),
                block_shape=tuple(lay["block_shape"]), format=lay["format"],
                method=lay["method"], seed=self.seed,
                metrics={"chosen": "dst", "kept_blocks": lay["kept_blocks"]})
            try:
                regroup.check_layout(r.mask2d, r.format, r.block_shape, r.row_perm,
                                     r.col_perm, r.panel_cols)
            except RegroupError as exc:
                raise RegroupError(f"{caller}: the layout of {fqn} is not valid: "
                                   f"{exc}") from None
            block = self._block.get(fqn)
            if block is not None:
                _, kept = layout_units(r)
                if (r.format, tuple(r.block_shape), int(kept.sum())) != (
                        block.core.format, block.core.block, block.core.n_blocks):
                    raise RegroupError(
                        f"{caller}: the layout of {fqn} ({r.format}, block "
                        f"{tuple(r.block_shape)}, {int(kept.sum())} units) does not fit its "
                        f"block-sparse module ({block.core.format}, block "
                        f"{block.core.block}, {block.core.n_blocks} blocks)")
            restored[fqn] = r
        for group in self.groups:
            fqn = group["tensor_fqn"]
            if fqn in self._block:
                self._set_block(fqn, self._block[fqn], restored[fqn])
                continue
            fake = _fake_sparsity(group["module"], group["tensor_name"])
            with torch.no_grad():
                fake.mask.copy_(torch.from_numpy(restored[fqn].mask).to(
                    device=fake.mask.device, dtype=fake.mask.dtype))
            self.state[fqn]["mask"] = fake.mask
        self.results = restored
        self.densities = dict(dst["densities"])
        self._t, self._updates = int(dst["t"]), int(dst["updates"])
        self.history = [dict(h) for h in dst["history"]]
        self._arm()

    # -- convert ---------------------------------------------------------------------------
    def convert(self, model: nn.Module, *, backend: str = "auto"  # type: ignore[override]
                ) -> nn.Module:
        """Squash the masks into the weights and swap the layers for block-sparse modules
        (:func:`~regroup.adapters.torch.to_block_sparse` with a runtime
        :class:`~regroup.adapters.torch.Plan` of :attr:`results`), in place; what
        :func:`to_block_sparse` reports per layer is kept in ``convert_report``. The
        sparsifier is done then (:meth:`step` refuses).

        With ``execution="block"`` the layers are block-sparse modules already: their
        hooks are removed, their path set to ``backend`` (as
        :func:`~regroup.adapters.torch.set_backend`), and only the layers in
        :attr:`masked` are squashed and converted as above (the element-wise ones and a
        model that is itself the layer stay dense-masked).

        Returns
        -------
        nn.Module
            ``model`` itself, converted.
        """
        if model is not getattr(self, "model", None):
            raise RegroupError("RegroupDST.convert: pass the model given to prepare()")
        if self._converted:
            raise RegroupError("RegroupDST.convert: the model is already converted")
        if self._block:
            check_choice(backend, "backend", "RegroupDST.convert", BACKENDS)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.squash_mask()
        self._converted = True
        self._arm()
        stay = dict(self.element_wise)
        if "weight" in self.masked and "weight" not in stay:
            stay["weight"] = self.masked["weight"]
        blocked = {n: r for n, r in self.results.items()
                   if n not in stay and n not in self._block}
        self.convert_report = to_block_sparse(model, Plan.from_result(blocked),
                                              backend=backend) if blocked else {}
        for n, module in self._block.items():
            set_backend(module, backend)
            self.convert_report[n] = (f"{type(module).__name__} (block-sparse since "
                                      "prepare, execution='block')")
        self.convert_report.update({n: f"stays dense-masked: {why}"
                                    for n, why in stay.items()})
        return model

    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """torch.ao's ``squash_mask`` on the layers that run masked (a block-sparse
        module of ``execution="block"`` has no mask to squash)."""
        groups = self.groups
        self.groups = [g for g in groups if g["tensor_fqn"] not in self._block]
        try:
            super().squash_mask(*args, **kwargs)
        finally:
            self.groups = groups
