"""Where permutations fold: the hidden dimensions of a model, found with torch.fx.

Permuting the output rows of a layer (and its bias, and the parameters and running stats
of the norms after it) and the input columns of every layer that reads those features
leaves the network's function unchanged. A *hidden dimension* is the set of tensor axes
that must then share one order: the outputs of its producers, the inputs of its
consumers, and everything in between that treats features one by one (activations,
dropout, BatchNorm, LayerNorm over that axis, depthwise convolutions, pooling, residual
additions - an addition joins the dimensions of its operands).

:func:`hidden_dims` traces the model with :mod:`torch.fx`, propagates shapes from example
inputs, and follows each feature axis through the graph. A dimension is foldable when
every use is understood; otherwise it records why not (it reaches a model input or output,
an op that reshapes or mixes features such as the head split of attention, a grouped
convolution, a module called twice, a layer's tensor read directly by the forward, ...),
and its layers use runtime permutations.

A model that torch.fx cannot trace as a whole (Hugging Face models, nn.TransformerEncoder)
is analysed by parts: one forward pass records every submodule's inputs, and each child
of an untraceable module is traced on its own, recursively. A dimension internal to a
traced part folds as in a traced model; one that reaches the part's inputs or outputs is
flagged as crossing its boundary. The torch.nn modules that torch.fx keeps whole inside a
traced model (nn.TransformerEncoder) are analysed the same way. Two untraceable blocks
whose code is fixed and known have exact rules: nn.TransformerEncoderLayer /
nn.TransformerDecoderLayer (linear1 -> activation -> dropout -> linear2) and transformers'
BERT-style layers (``intermediate`` feeding ``output``, the feeding checked on the forward
pass; look-alike classes from elsewhere are not trusted).
"""
from __future__ import annotations

import inspect
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
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
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
        The channel-wise modules whose parameters follow it along their first axis:
        BatchNorm / LayerNorm (parameters and running stats) and depthwise convolutions
        (``groups == in_channels == out_channels``: weight ``(C, 1, kh, kw)`` with its
        mask, and bias). A depthwise convolution's input and output are this same
        dimension; it is never a producer or consumer (no block layout applies to it).
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
    called as a module (both the same dimension for a depthwise convolution); ``dims``
    lists the dimensions; ``uncalled`` maps the Linear / Conv2d modules that are never
    called as modules (their weight is used by a parent module, e.g.
    ``nn.MultiheadAttention.out_proj``) to the reason; ``traced`` is False when the model
    could not be traced as a whole (``error`` says why); ``parts`` then says how each
    analysed submodule was handled (``"traced"``, why not, the rule applied; ``""`` is
    the model itself); ``direct`` maps the layers and norms whose tensors the forward also
    reads itself (``F.linear(x, self.fc.weight)``) to the reason (their dimensions do not
    fold, and a block-sparse module would not have the tensor to read).
    """

    dims: list[HiddenDim]
    layer_dims: dict[str, tuple[int, int]]
    uncalled: dict[str, str]
    traced: bool = True
    error: str | None = None
    parts: dict[str, str] = field(default_factory=dict)
    direct: dict[str, str] = field(default_factory=dict)


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

    def get(self, i: int) -> HiddenDim:
        return self.dims[self.find(i)]


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


def _depthwise(mod: nn.Module) -> bool:
    """A convolution that filters each channel on its own (channel multiplier 1)."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and \
        mod.groups == mod.in_channels == mod.out_channels


def _sizes(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return mod.in_channels, mod.out_channels


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _error(exc: BaseException) -> str:
    """One line of an exception, short enough for a reason."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _untraced(model: nn.Module, error: str) -> DimAnalysis:
    uf = _UnionFind()
    layer_dims = {}
    why = f"the model could not be traced by torch.fx ({error})"
    for name, m in _layers(model).items():
        n_in, n_out = _sizes(m)
        i, o = uf.new(n_in, why), uf.new(n_out, why)
        uf.dims[i].consumers.append(name)
        uf.dims[o].producers.append(name)
        layer_dims[name] = (i, o)
    return DimAnalysis(uf.dims, layer_dims, {}, traced=False, error=error)


def hidden_dims(model: nn.Module, example_inputs: tuple) -> DimAnalysis:
    """Trace ``model`` on ``example_inputs`` and return its hidden dimensions.

    A model that torch.fx cannot trace gives ``traced=False`` and is analysed by parts
    (see the module docstring; ``parts`` says how). When even its forward pass on
    ``example_inputs`` fails, every layer side gets its own non-foldable dimension.
    """
    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not traceable"
        error = _error(exc)
        try:
            calls = _Calls(model, example_inputs)
        except Exception as exc2:  # noqa: BLE001 - nothing to analyse without a forward pass
            return _untraced(model, f"{error}; its forward pass on the example inputs "
                                    f"failed too ({_error(exc2)})")
        walk = _Walk(model, example_inputs)
        walk.by_parts(model, "", "", error, calls)
        return walk.result(traced=False, error=error)
    walk = _Walk(model, example_inputs)
    walk.graph(gm)
    return walk.result()


class _Calls:
    """Every submodule's first inputs (cloned) in one forward pass of ``model``, how many
    times it was called, whether its calls all had the same non-tensor arguments, and
    which module made its first input (the module whose output is that very tensor)."""

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        self.count: dict[str, int] = {}
        self.varies: set[str] = set()
        self.fed_by: dict[str, str | None] = {}
        keys: dict[str, tuple] = {}
        made_by: dict[int, str] = {}
        alive: list[torch.Tensor] = []           # keeps made_by's ids from being reused

        def before(name: str):
            def hook(_mod, args, kwargs):
                self.count[name] = self.count.get(name, 0) + 1
                key = _call_key(args, kwargs)
                if name not in self.inputs:
                    keys[name] = key
                    self.inputs[name] = (_clone(args), _clone(kwargs))
                    first = args[0] if args else None
                    self.fed_by[name] = made_by.get(id(first)) \
                        if isinstance(first, torch.Tensor) else None
                elif key != keys[name]:
                    self.varies.add(name)
            return hook

        def after(name: str):
            def hook(_mod, _args, out):
                if isinstance(out, torch.Tensor):
                    made_by[id(out)] = name      # an enclosing module overwrites: outermost
                    alive.append(out)
            return hook

        handles = []
        for name, mod in model.named_modules():       # the model too: "" counts its runs
            handles.append(mod.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(after(name)))
        try:
            with torch.no_grad():
                model(*inputs)
        finally:
            for h in handles:
                h.remove()


def _clone(value: Any) -> Any:
    """Detached copies of the tensors in ``value`` (later in-place ops must not reach
    them); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """What a trace specialises on: the non-tensor arguments (by value when simple)."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return "tensor"
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return (type(v).__name__, id(v))
    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def _trace_part(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``module`` alone with its non-tensor arguments fixed to the captured values,
    and propagate the captured tensors' shapes."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    concrete, values = {}, []
    for name, param in sig.parameters.items():
        value = bound.arguments.get(name)
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if value:
                stars = "*" if param.kind == param.VAR_POSITIONAL else "**"
                raise TypeError(f"called with variadic arguments ({stars}{name})")
            continue
        if not isinstance(value, torch.Tensor):
            concrete[name] = value
        values.append(value)
    gm = fx.symbolic_trace(module, concrete_args=concrete or None)
    with torch.no_grad():
        ShapeProp(gm).propagate(*values)
    return gm


class _Walk:
    """The hidden dimensions of one model, gathered over one or more traced graphs."""

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.model, self.inputs = model, inputs
        self.calls: _Calls | str | None = None   # made on demand; str: why it failed
        self.modules = dict(model.named_modules())
        self.layers = _layers(model)
        self.uf = _UnionFind()
        self.layer_dims: dict[str, tuple[int, int]] = {}
        self.channelwise: dict[str, int] = {}    # norm / depthwise conv -> its dim
        self.parts: dict[str, str] = {}
        self.direct: dict[str, str] = {}         # module -> why its tensors are read directly

    # -- one traced graph ----------------------------------------------------------------
    def graph(self, gm: fx.GraphModule, prefix: str = "", boundary: str | None = None,
              seeds: dict[int, tuple[int, int]] | None = None, keep_output: bool = False,
              calls: _Calls | None = None) -> tuple[int, int] | None:
        """Follow the feature axes through ``gm``, the traced module at ``prefix``.

        ``boundary`` is None for the whole model; for a part, the reason (``"crosses the
        boundary of ..."``) of every dimension that reaches the part's inputs or outputs.
        ``seeds`` gives placeholders (by position) a known dimension and axis; with
        ``keep_output`` the dimension of the part's single output is returned (its
        reader continues it) instead of being flagged. ``calls`` (for a part) checks that
        its modules ran only from its own code.
        """
        uf = self.uf
        axis: dict[fx.Node, tuple[int, int]] = {}    # node -> (dim id, axis index)
        outside: set[fx.Node] = set()                # unseeded inputs and what they make
        seeds = seeds or {}
        placeholders = 0
        found = None
        in_graph: dict[str, int] = {}

        def dim_of(node: Any, want_axis: int | None, size: int, user: str) -> int:
            """The dim of ``node``'s feature axis ``want_axis``; a fresh flagged dim when
            that axis is not tracked."""
            got = axis.get(node) if isinstance(node, fx.Node) else None
            if got is not None and want_axis is not None and got[1] == want_axis:
                return got[0]
            if got is not None:
                uf.flag(got[0], f"{user} reads another axis of it")
            if boundary is not None and node in outside:
                return uf.new(size, f"the input of {user} {boundary}")
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
            if node.op == "placeholder":
                if placeholders in seeds:
                    axis[node] = seeds[placeholders]
                else:
                    outside.add(node)
                placeholders += 1
                continue
            if any(a in outside for a in _nodes_in((node.args, node.kwargs))):
                outside.add(node)
            if node.op == "call_module":
                name = _join(prefix, node.target)
                in_graph[name] = in_graph.get(name, 0) + 1
                mod = self.modules.get(name)
                x = node.args[0] if node.args else None
                xs = _shape(x)
                if name in self.layers and _depthwise(mod):
                    d = dim_of(x, 1 if xs else None, mod.in_channels,
                               f"depthwise Conv2d {name!r}")
                    self._channelwise(name, d)
                    self.layer_dims[name] = (d, d)
                    if shape:
                        axis[node] = (d, 1)
                    continue
                if name in self.layers:
                    is_lin = isinstance(mod, nn.Linear)
                    n_in, n_out = _sizes(mod)
                    want = (len(xs) - 1 if is_lin else 1) if xs else None
                    i = dim_of(x, want, n_in, f"{type(mod).__name__} {name!r}")
                    o = uf.new(n_out)
                    uf.get(i).consumers.append(name)
                    uf.dims[o].producers.append(name)
                    if not is_lin and mod.groups != 1:
                        uf.flag(i, f"grouped convolution {name!r}")
                        uf.flag(o, f"grouped convolution {name!r}")
                    if name in self.layer_dims:
                        for d in (*self.layer_dims[name], i, o):
                            uf.flag(d, f"module {name!r} is called more than once")
                    self.layer_dims[name] = (i, o)
                    if shape:
                        axis[node] = (o, len(shape) - 1 if is_lin else 1)
                    continue
                if name not in self.parts and any(n.startswith(name + ".") for n in self.layers):
                    self._leaf(name, mod, calls)
                if x in axis and shape is not None:
                    d, ax = axis[x]
                    size = uf.get(d).size
                    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and ax == 1 \
                            and mod.num_features == size:
                        self._channelwise(name, d)
                        axis[node] = (d, ax)
                        continue
                    if isinstance(mod, nn.LayerNorm) \
                            and tuple(mod.normalized_shape) == (size,) and ax == len(xs) - 1:
                        self._channelwise(name, d)
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
                flat = (fn in _FLATTEN) if node.op == "call_function" \
                    else fn in _FLATTEN_METHODS
                if flat and x in axis and _flatten_keeps(xs, shape, axis[x][1]):
                    axis[node] = axis[x]
                    continue
                binary = fn in _BINARY if node.op == "call_function" \
                    else fn in _BINARY_METHODS
                if binary and shape is not None and _binary(
                        node, shape, axis, uf, outside if boundary is not None else set(),
                        boundary):
                    continue
                if _nodes_in((node.args, node.kwargs)):
                    opaque(node, f"{getattr(fn, '__name__', fn)}")
            elif node.op == "get_attr":
                self._direct_read(_join(prefix, node.target), node.name)
            elif node.op == "output":
                outs = _nodes_in(node.args)
                if keep_output and len(outs) == 1 and outs[0] in axis:
                    found = axis[outs[0]]
                    continue
                for arg in outs:
                    if arg in axis:
                        uf.flag(axis[arg][0], "it is a model output" if boundary is None
                                else f"it {boundary}")
        if calls is not None:
            # A module of the part that the untraced code above also calls directly runs
            # on features the part's folds do not see.
            runs = calls.count.get(prefix, 0)
            for name, n in in_graph.items():
                if calls.count.get(name, 0) != runs * n:
                    self._flag_module(name, f"{name!r} is also called from outside "
                                            f"{prefix!r}")
        return found

    def _direct_read(self, target: str, node: str) -> None:
        """The forward reads tensor ``target`` itself (``F.linear(x, self.fc.weight)``): a
        fold permuting the layer or norm that holds it would change that use too."""
        owner = target
        while "." in owner:
            owner = owner.rpartition(".")[0]
            if owner in self.layers or isinstance(self.modules.get(owner), _NORMS):
                self.direct.setdefault(owner, f"its tensor {target!r} is read directly in the "
                                              f"forward ({node}), not only by calling "
                                              f"{owner!r}")
                return

    def _leaf(self, name: str, mod: nn.Module, calls: _Calls | None) -> None:
        """A module torch.fx keeps whole (a torch.nn module such as nn.TransformerEncoder)
        with layers inside: its children are analysed by parts, on the inputs of one
        forward pass of the model."""
        if calls is None:
            if self.calls is None:
                try:
                    self.calls = _Calls(self.model, self.inputs)
                except Exception as exc:  # noqa: BLE001 - recorded; its layers stay uncalled
                    self.calls = _error(exc)
            if isinstance(self.calls, str):
                self.parts[name] = ("not analysed: the forward pass that records its inputs "
                                    f"failed ({self.calls})")
                return
            calls = self.calls
        why = "torch.fx keeps torch.nn modules whole"
        self.parts[name] = f"not traced: {why}"
        self.by_parts(mod, name, name, why, calls)

    def _flag_module(self, name: str, reason: str) -> None:
        """Flag the dimensions of layer or channel-wise module ``name``."""
        for d in self.layer_dims.get(name, ()):
            self.uf.flag(d, reason)
        if name in self.channelwise:
            self.uf.flag(self.channelwise[name], reason)

    def _channelwise(self, name: str, d: int) -> None:
        """``name`` (a norm or depthwise conv) acts channel by channel on dim ``d``; a
        second use joins both dims (its parameters follow one order)."""
        if name in self.channelwise:
            self.uf.union(self.channelwise[name], d)
        else:
            self.uf.get(d).norms.append(name)
            self.channelwise[name] = d

    # -- a model torch.fx cannot trace whole ---------------------------------------------
    def by_parts(self, module: nn.Module, prefix: str, owner: str, error: str,
                 calls: _Calls) -> None:
        """Analyse the children of ``module`` (at ``prefix``), whose code torch.fx could
        not trace: ``owner`` is the nearest untraceable module that runs that code (``""``
        for the model) and ``error`` why it could not be traced."""
        why = (f"the model could not be traced by torch.fx ({error})" if not owner else
               f"it passes through the code of {owner!r}, which torch.fx could not trace "
               f"({error})")
        above = ("the model above it" if not owner else f"{owner!r} above it") + \
            f" could not be traced: {error}"
        handled = self._known_block(module, prefix, why, above, calls)
        for child_name, child in module.named_children():
            name = _join(prefix, child_name)
            if child_name in handled or not any(
                    n == name or n.startswith(name + ".") for n in self.layers):
                continue
            if name in self.layers:
                if name in calls.inputs:
                    self._opaque_layer(name, why)
                continue                           # never called: reported as uncalled
            if name not in calls.inputs:           # a container (ModuleList) or unused
                self.by_parts(child, name, owner, error, calls)
                continue
            try:
                if name in calls.varies:
                    raise TypeError("called with different non-tensor arguments")
                gm = _trace_part(child, *calls.inputs[name])
            except Exception as exc:  # noqa: BLE001 - any failure: go one level down
                self.parts[name] = f"not traced: {_error(exc)}"
                self.by_parts(child, name, name, _error(exc), calls)
                continue
            self.parts[name] = "traced"
            self.graph(gm, name, f"crosses the boundary of {name!r} ({above})", calls=calls)

    def _record(self, prefix: str, what: str) -> None:
        """Add ``what`` to how the part at ``prefix`` was handled."""
        self.parts[prefix] = f"{self.parts[prefix]}; {what}" if prefix in self.parts else what

    def _opaque_layer(self, name: str, why: str) -> None:
        """A layer called from untraceable code: its sides do not fold."""
        mod = self.layers[name]
        n_in, n_out = _sizes(mod)
        if _depthwise(mod):
            d = self.uf.new(n_in, why)
            self._channelwise(name, d)
            self.layer_dims[name] = (d, d)
            return
        i, o = self.uf.new(n_in, why), self.uf.new(n_out, why)
        self.uf.dims[i].consumers.append(name)
        self.uf.dims[o].producers.append(name)
        self.layer_dims[name] = (i, o)

    def _known_block(self, module: nn.Module, prefix: str, why: str, above: str,
                     calls: _Calls) -> set[str]:
        """Exact rules for untraceable blocks whose code is fixed and known; returns the
        children they account for."""
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return self._transformer_layer(module, prefix, why, calls)
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        children = dict(module.named_children())
        if children.get("intermediate") is not None and children.get("output") is not None \
                and isinstance(getattr(inter, "dense", None), nn.Linear) \
                and isinstance(getattr(out, "dense", None), nn.Linear):
            # The rule trusts the layer's code to use the intermediate's output only as
            # output's input (the forward pass checks the feeding, not other uses): it
            # holds for transformers' BertLayer and its copies, not for any look-alike.
            if not type(module).__module__.startswith("transformers."):
                self._record(prefix, "BERT-style rule not applied: "
                                     f"{type(module).__name__} is not a transformers layer")
                return set()
            return self._bert_layer(inter, out, prefix, above, calls)
        return set()

    def _transformer_layer(self, module: nn.Module, prefix: str, why: str, calls: _Calls
                           ) -> set[str]:
        """nn.Transformer{Encoder,Decoder}Layer: ``linear2(dropout(activation(linear1(x))))``
        (also in its fused fast path, which reads the same parameters)."""
        l1, l2 = _join(prefix, "linear1"), _join(prefix, "linear2")
        if not (isinstance(self.layers.get(l1), nn.Linear)
                and isinstance(self.layers.get(l2), nn.Linear)):
            return set()
        n_in, hidden = _sizes(self.layers[l1])
        n_hidden, n_out = _sizes(self.layers[l2])
        i, d, o = self.uf.new(n_in, why), self.uf.new(hidden), self.uf.new(n_out, why)
        if n_hidden != hidden:
            self.uf.flag(d, f"linear1 and linear2 of {prefix!r} do not share a size")
        act = module.activation
        if not (isinstance(act, _ELEMENTWISE_MODULES) or act in _ELEMENTWISE_FUNCS):
            self.uf.flag(d, f"the activation of {prefix!r} ({getattr(act, '__name__', act)}) "
                            "is not known to act feature by feature")
        if not isinstance(module.dropout, _ELEMENTWISE_MODULES):
            self.uf.flag(d, f"the dropout of {prefix!r} is a {type(module.dropout).__name__}")
        self.uf.dims[i].consumers.append(l1)
        self.uf.dims[d].producers.append(l1)
        self.uf.dims[d].consumers.append(l2)
        self.uf.dims[o].producers.append(l2)
        self.layer_dims[l1], self.layer_dims[l2] = (i, d), (d, o)
        runs = calls.count.get(prefix, 0)
        for name in (l1, l2):
            if calls.count.get(name, 0) not in (0, runs):    # 0: the fused fast path ran
                self.uf.flag(d, f"{name!r} is also called from outside {prefix!r}")
        self._record(prefix, f"{type(module).__name__} rule: linear1 -> activation -> linear2")
        handled = {"linear1", "linear2", "dropout"}
        if isinstance(act, nn.Module):
            handled.add("activation")
        return handled

    def _bert_layer(self, inter: nn.Module, out: nn.Module, prefix: str, above: str,
                    calls: _Calls) -> set[str]:
        """A BERT-style layer (transformers' BertLayer and its copies):
        ``output(intermediate(x), x)``. Both parts are traced on their own and the
        intermediate's output dimension continues into ``output``'s first input, when
        the forward pass shows that very tensor passing from one to the other."""
        pi, po = _join(prefix, "intermediate"), _join(prefix, "output")
        if calls.fed_by.get(po) != pi or pi in calls.varies or po in calls.varies:
            self._record(prefix, f"BERT-style rule not applied: {po!r} is not called on the "
                                 f"output of {pi!r} (with the same arguments each time)")
            return set()
        try:
            gm_i = _trace_part(inter, *calls.inputs[pi])
            gm_o = _trace_part(out, *calls.inputs[po])
        except Exception as exc:  # noqa: BLE001 - the generic recursion takes over
            self._record(prefix, f"BERT-style rule not applied: {_error(exc)}")
            return set()
        hidden = self.graph(gm_i, pi, f"crosses the boundary of {pi!r} ({above})",
                            keep_output=True, calls=calls)
        self.graph(gm_o, po, f"crosses the boundary of {po!r} ({above})",
                   seeds={0: hidden} if hidden is not None else None, calls=calls)
        self._record(prefix, "BERT-style rule: intermediate -> output")
        self.parts[pi] = self.parts[po] = "traced"
        return {"intermediate", "output"}

    # -- the outcome ---------------------------------------------------------------------
    def result(self, traced: bool = True, error: str | None = None) -> DimAnalysis:
        uf = self.uf
        for name, why in self.direct.items():     # known only once every part is walked
            self._flag_module(name, why)
        uncalled = {}
        for name in self.layers:
            if name not in self.layer_dims:
                parent = name.rpartition(".")[0]
                owner = type(self.modules[parent]).__name__ if parent else "the model"
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
                                  for k, (i, o) in self.layer_dims.items()}, uncalled,
                           traced=traced, error=error, parts=self.parts,
                           direct=dict(self.direct))


def _flatten_keeps(xs, shape, ax: int) -> bool:
    """A reshape keeps the feature axis when only size-1 axes after it disappear."""
    if xs is None or shape is None or len(shape) != ax + 1:
        return False
    return tuple(shape) == tuple(xs[:ax + 1]) and all(s == 1 for s in xs[ax + 1:])


def _binary(node: fx.Node, shape, axis, uf: _UnionFind, outside: set[fx.Node],
            boundary: str | None) -> bool:
    """Elementwise binary op: join the operands' dims; flag those combined with an
    untracked tensor that varies along the feature axis (``outside``: those coming
    from beyond the part's ``boundary``). True when handled."""
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
                uf.flag(root, f"combined in {node.name} with {a.name}, which {boundary}"
                        if a in outside else
                        f"combined with an untracked tensor ({a.name}) in {node.name}")
    axis[node] = (root, ax)
    return True
