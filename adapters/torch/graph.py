"""Where permutations fold: the hidden dimensions of a model, found with torch.fx.

Permuting the output rows of a layer (and its bias, and the parameters and running stats
of the norms after it) and the input columns of every layer that reads those features
leaves the network's function unchanged. A *hidden dimension* is the set of tensor axes
that must then share one order: the outputs of its producers, the inputs of its
consumers, and everything in between that treats features one by one (activations,
dropout, BatchNorm, LayerNorm over that axis, pooling, residual additions - an addition
joins the dimensions of its operands).

:func:`hidden_dims` traces the model with :mod:`torch.fx`, propagates shapes from example
inputs, and follows each feature axis through the graph. A dimension is foldable when
every use is understood; otherwise it records why not (it reaches a model input or output,
an op that reshapes or mixes features such as the head split of attention, a grouped
convolution, a module called twice, ...), and its layers use runtime permutations.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["HiddenDim", "DimAnalysis", "hidden_dims"]

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.CELU, nn.SELU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
    torch.nn.functional.relu6, torch.nn.functional.gelu, torch.nn.functional.silu,
    torch.nn.functional.leaky_relu, torch.nn.functional.elu, torch.nn.functional.dropout,
    torch.nn.functional.hardswish, torch.nn.functional.mish, torch.nn.functional.softplus,
    torch.nn.functional.sigmoid, torch.nn.functional.tanh, torch.abs, torch.neg, torch.exp,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "abs", "neg", "exp", "contiguous",
                        "clone", "float", "to", "type_as"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_POOL_FUNCS = {torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
               torch.nn.functional.adaptive_avg_pool2d,
               torch.nn.functional.adaptive_max_pool2d}
_FLATTEN = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}


@dataclass
class HiddenDim:
    """One hidden dimension: the axes that must share one order.

    Attributes
    ----------
    size : int
    producers : list of str
        Modules (Linear / Conv2d) whose output features are this dimension (their weight
        rows and bias).
    consumers : list of str
        Modules whose input features are this dimension (weight columns; for Conv2d, input
        channels, i.e. groups of kh*kw flattened columns).
    norms : list of str
        BatchNorm / LayerNorm modules whose parameters and running stats follow it.
    reasons : list of str
        Why it cannot be folded; empty when it can.
    """

    size: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def foldable(self) -> bool:
        return not self.reasons and bool(self.producers) and bool(self.consumers)


@dataclass
class DimAnalysis:
    """The outcome of :func:`hidden_dims`.

    ``layer_dims[name] = (input dim index, output dim index)`` for every Linear / Conv2d
    called as a module; ``dims`` lists the dimensions; ``uncalled`` maps the Linear /
    Conv2d modules that the graph never calls (their weight is used by a parent module,
    e.g. ``nn.MultiheadAttention.out_proj``) to the reason; ``traced`` is False when the
    model could not be traced (``error`` says why).
    """

    dims: list[HiddenDim]
    layer_dims: dict[str, tuple[int, int]]
    uncalled: dict[str, str]
    traced: bool = True
    error: str | None = None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.dims: list[HiddenDim] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.dims.append(HiddenDim(size, reasons=[reason] if reason else []))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            da, db = self.dims[a], self.dims[b]
            if da.size != db.size:
                da.reasons.append(f"joins features of sizes {da.size} and {db.size}")
            for attr in ("producers", "consumers", "norms", "reasons"):
                getattr(da, attr).extend(getattr(db, attr))
        return a

    def flag(self, i: int, reason: str) -> None:
        d = self.dims[self.find(i)]
        if reason not in d.reasons:
            d.reasons.append(reason)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _nodes_in(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name}


def _untraced(model: nn.Module, error: str) -> DimAnalysis:
    uf = _UnionFind()
    layer_dims = {}
    for name, m in _layers(model).items():
        n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        n_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        why = "the model could not be traced by torch.fx"
        i, o = uf.new(n_in, why), uf.new(n_out, why)
        uf.dims[i].consumers.append(name)
        uf.dims[o].producers.append(name)
        layer_dims[name] = (i, o)
    return DimAnalysis(uf.dims, layer_dims, {}, traced=False, error=error)


def hidden_dims(model: nn.Module, example_inputs: tuple) -> DimAnalysis:
    """Trace ``model`` on ``example_inputs`` and return its hidden dimensions.

    A model that torch.fx cannot trace gives ``traced=False`` and one non-foldable
    dimension per layer side (the caller then uses runtime permutations everywhere and
    says so).
    """
    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not traceable"
        return _untraced(model, f"{type(exc).__name__}: {exc}".strip()[:300])
    modules = dict(model.named_modules())
    layers = _layers(model)
    uf = _UnionFind()
    axis: dict[fx.Node, tuple[int, int]] = {}    # node -> (dim id, axis index)
    layer_dims: dict[str, tuple[int, int]] = {}
    calls: dict[str, int] = {}

    def dim_of(node: Any, want_axis: int | None, size: int, user: str) -> int:
        """The dim of ``node``'s feature axis ``want_axis``; a fresh flagged dim when
        that axis is not tracked."""
        got = axis.get(node) if isinstance(node, fx.Node) else None
        if got is not None and want_axis is not None and got[1] == want_axis:
            return got[0]
        if got is not None:
            uf.flag(got[0], f"{user} reads another axis of it")
        src = node.name if isinstance(node, fx.Node) else "a constant"
        return uf.new(size, f"the input of {user} ({src}) is not the output of a "
                            "Linear/Conv2d through feature-wise ops (model input or "
                            "untracked op)")

    def opaque(node: fx.Node, what: str) -> None:
        for arg in _nodes_in((node.args, node.kwargs)):
            if arg in axis:
                uf.flag(axis[arg][0], f"used by {what} ({node.name}), which reshapes or "
                                      "mixes features")

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "call_module":
            mod = modules.get(node.target)
            name = node.target
            x = node.args[0] if node.args else None
            xs = _shape(x)
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and name in layers:
                calls[name] = calls.get(name, 0) + 1
                is_lin = isinstance(mod, nn.Linear)
                n_in = mod.in_features if is_lin else mod.in_channels
                n_out = mod.out_features if is_lin else mod.out_channels
                want = (len(xs) - 1 if is_lin else 1) if xs else None
                i = dim_of(x, want, n_in, f"{type(mod).__name__} {name!r}")
                o = uf.new(n_out)
                uf.dims[uf.find(i)].consumers.append(name)
                uf.dims[o].producers.append(name)
                if not is_lin and mod.groups != 1:
                    uf.flag(i, f"grouped convolution {name!r}")
                    uf.flag(o, f"grouped convolution {name!r}")
                if name in layer_dims:
                    for d in (*layer_dims[name], i, o):
                        uf.flag(d, f"module {name!r} is called more than once")
                layer_dims[name] = (i, o)
                if shape:
                    axis[node] = (o, len(shape) - 1 if is_lin else 1)
                continue
            if x in axis and shape is not None:
                d, ax = axis[x]
                size = uf.dims[uf.find(d)].size
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and ax == 1 \
                        and mod.num_features == size:
                    uf.dims[uf.find(d)].norms.append(name)
                    axis[node] = (d, ax)
                    continue
                if isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (size,) \
                        and ax == len(xs) - 1:
                    uf.dims[uf.find(d)].norms.append(name)
                    axis[node] = (d, ax)
                    continue
                if isinstance(mod, _ELEMENTWISE_MODULES) and shape == xs:
                    axis[node] = (d, ax)
                    continue
                if isinstance(mod, _POOL_MODULES) and ax == 1 and len(xs) == 4:
                    axis[node] = (d, ax)
                    continue
                if isinstance(mod, nn.Flatten) and _flatten_keeps(xs, shape, ax):
                    axis[node] = (d, ax)
                    continue
            opaque(node, f"module {name!r} ({type(mod).__name__})")
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            x = node.args[0] if node.args else None
            xs = _shape(x)
            unary = (fn in _ELEMENTWISE_FUNCS if node.op == "call_function"
                     else fn in _ELEMENTWISE_METHODS)
            if unary and x in axis and shape == xs:
                axis[node] = axis[x]
                continue
            pool = node.op == "call_function" and fn in _POOL_FUNCS
            if pool and x in axis and axis[x][1] == 1 and xs and len(xs) == 4:
                axis[node] = axis[x]
                continue
            flat = (fn in _FLATTEN) if node.op == "call_function" else fn in _FLATTEN_METHODS
            if flat and x in axis and _flatten_keeps(xs, shape, axis[x][1]):
                axis[node] = axis[x]
                continue
            binary = fn in _BINARY if node.op == "call_function" else fn in _BINARY_METHODS
            if binary and shape is not None and _binary(node, shape, axis, uf):
                continue
            if _nodes_in((node.args, node.kwargs)):
                opaque(node, f"{getattr(fn, '__name__', fn)}")
        elif node.op == "output":
            for arg in _nodes_in(node.args):
                if arg in axis:
                    uf.flag(axis[arg][0], "it is a model output")
    uncalled = {}
    for name in layers:
        if name not in layer_dims:
            parent = name.rpartition(".")[0]
            owner = type(modules[parent]).__name__ if parent else "the model"
            uncalled[name] = (f"not called as a module (its weight is used directly by "
                              f"{owner} {parent!r})")
    # Representatives only, in first-seen order; indices remapped to the list.
    roots = sorted({uf.find(i) for i in range(len(uf.parent))})
    index = {r: k for k, r in enumerate(roots)}
    dims = [uf.dims[r] for r in roots]
    for d in dims:
        d.producers = list(dict.fromkeys(d.producers))
        d.consumers = list(dict.fromkeys(d.consumers))
        d.norms = list(dict.fromkeys(d.norms))
    return DimAnalysis(dims, {k: (index[uf.find(i)], index[uf.find(o)])
                              for k, (i, o) in layer_dims.items()}, uncalled)


def _flatten_keeps(xs, shape, ax: int) -> bool:
    """A reshape keeps the feature axis when only size-1 axes after it disappear."""
    if xs is None or shape is None or len(shape) != ax + 1:
        return False
    return tuple(shape) == tuple(xs[:ax + 1]) and all(s == 1 for s in xs[ax + 1:])


def _binary(node: fx.Node, shape, axis, uf: _UnionFind) -> bool:
    """Elementwise binary op: join the operands' dims; flag those combined with an
    untracked tensor that varies along the feature axis. True when handled."""
    ops = [a for a in node.args[:2]]
    tracked = [(a, axis[a]) for a in ops if isinstance(a, fx.Node) and a in axis]
    if not tracked:
        return False
    out_nd = len(shape)
    aligned = set()
    for a, (_, ax) in tracked:
        aligned.add(ax + out_nd - len(_shape(a) or shape))
    dims = [d for _, (d, _) in tracked]
    if len(aligned) != 1:
        for d in dims:
            uf.flag(d, f"combined along different axes in {node.name}")
        return False
    ax = aligned.pop()
    root = dims[0]
    for d in dims[1:]:
        root = uf.union(root, d)
    for a in ops:
        if isinstance(a, fx.Node) and a not in axis:
            s = _shape(a)
            if s is None:
                continue                       # a Python scalar computed in the graph
            k = ax - (out_nd - len(s))
            if 0 <= k < len(s) and s[k] != 1:
                uf.flag(root, f"combined with an untracked tensor ({a.name}) in {node.name}")
    axis[node] = (root, ax)
    return True
