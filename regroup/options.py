"""The options of a regrouping run: one frozen record, validated once, from one table.

Every entry point (:func:`regroup.regroup_pattern`, :func:`regroup.regroup_file`,
:func:`regroup.regroup_checkpoint`, :func:`regroup.compare.compare`, the PyTorch
adapters and the CLI) takes ``options=RegroupOptions(...)``; keyword arguments naming
its fields are a convenience that builds (or overrides) one. Each field's constraint is a
row of :data:`CONSTRAINTS`: what it accepts, how it is normalised, and values it must
refuse (the common invalid-parameter test draws them from here).
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .validation import RegroupError, check_block
from .blocks import FORMATS, Budget
from .nm import NM_METHODS, check_nm, nm_method_problem
from .partitioners import format_method, get_partitioner, list_partitioners, parse_method

__all__ = ["RegroupOptions", "Constraint", "CONSTRAINTS", "BUDGET_RANGES", "OBJECTIVES",
           "EDGES", "BUDGET_SCOPES", "DENSE_ABOVE", "LAYOUT_FORMATS", "NM_DEFAULT",
           "resolve_options", "check_budget"]

OBJECTIVES = ("auto", "count", "magnitude")
EDGES = ("partial", "error")
BUDGET_SCOPES = ("layer", "global")
# Tensors of a file or model denser than this are not taken for pruned layers. Deliberate
# pruning leaves >= 10 % zeros in practice (2:4 is 50 %, magnitude and movement schedules
# 50-95 %); an unpruned tensor's incidental zeros (float underflow, padding rows, int8
# rounding) stay at a few % at most. 5 % sits between the two with margin on each side,
# and a layer this dense gains nothing from block sparsity while it is the slowest input
# a partitioner gets (every row shares columns with every other).
DENSE_ABOVE = 0.95
#: What ``chain="auto"`` (the default) becomes where it applies: regroup_model with
#: example inputs to trace, a per-layer budget and a block format.
CHAIN_AUTO = 0.01
# Every format: the block layouts of regroup.blocks, and N:M (regroup.nm): a column
# permutation and the N:M mask of the permuted weight.
LAYOUT_FORMATS = (*FORMATS, "nm")
NM_DEFAULT = (2, 4)


class _Invalid(Exception):
    """Raised by a normaliser; carries the exception type the caller should see."""

    def __init__(self, kind: type[Exception] = ValueError, detail: str = "") -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Constraint:
    """One option: ``allowed`` reads as "must be <allowed>", ``normalize`` returns the
    canonical value or raises ``_Invalid``, ``invalid`` lists values it must refuse."""

    allowed: str
    normalize: Callable[[Any], Any]
    invalid: tuple[Any, ...]


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def norm(v: Any) -> str:
        if not isinstance(v, str):
            raise _Invalid(TypeError)
        if v not in options:
            raise _Invalid(ValueError)
        return v
    return norm


def _number(low: float, high: float, *, low_open: bool = False, optional: bool = False,
            integer: bool = False) -> Callable[[Any], Any]:
    def norm(v: Any) -> Any:
        if v is None and optional:
            return None
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(v, bool) or not isinstance(v, kind):
            raise _Invalid(TypeError)
        try:
            v = int(v) if integer else float(v)
        except OverflowError:            # an int beyond the float range: 10**400
            raise _Invalid(ValueError) from None
        if math.isnan(v) or v < low or v > high or (low_open and v == low):
            raise _Invalid(ValueError)
        return v
    return norm


def _block(v: Any) -> tuple[int, int]:
    try:
        return check_block(v, "")
    except TypeError:
        raise _Invalid(TypeError) from None
    except ValueError:
        raise _Invalid(ValueError) from None


def _method(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(TypeError)
    if v in NM_METHODS:      # whether it fits the format is checked with the format
        return v
    try:
        return format_method(*parse_method(v))
    except ValueError as exc:
        raise _Invalid(ValueError, str(exc)) from None


# The values each budget kind accepts: (low, high, low excluded, integer). An area factor
# above 2**31 (MAX_ELEMENTS) keeps every block of any layer, as 2**31 does; a block count
# above 2**53 is not exact as a float.
BUDGET_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "iso": (0.0, float(2**31), True, False), "density": (0.0, 1.0, True, False),
    "retained": (0.0, 1.0, True, False), "blocks": (1.0, float(2**53), False, True)}


def _bound(x: float) -> str:
    return f"2**{int(math.log2(x))}" if x >= 2**20 else f"{x:g}"


def _range_text(kind: str) -> str:
    low, high, low_open, integer = BUDGET_RANGES[kind]
    what = "an integer" if integer else "a number"
    return f"{what} in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"


def _budget(v: Any) -> Budget:
    if not isinstance(v, (str, Budget)):
        raise _Invalid(TypeError)
    try:
        b = Budget.parse(v)
    except (TypeError, ValueError) as exc:
        raise _Invalid(ValueError, str(exc)) from None
    except OverflowError:                 # 'blocks=1e400': an infinite count
        kind = str(v).replace(":", "=").partition("=")[0].strip()
        need = _range_text(kind) if kind in BUDGET_RANGES else "a finite value"
        raise _Invalid(ValueError, f"budget {kind!r} needs {need}. Got {v!r} instead.") \
            from None
    if b.value is not None and b.kind in BUDGET_RANGES:
        low, high, low_open, integer = BUDGET_RANGES[b.kind]
        x = b.value
        if (isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x)
                or not low <= x <= high or (low_open and x == low)
                or (integer and x != int(x))):
            raise _Invalid(ValueError, f"budget {b.kind!r} needs {_range_text(b.kind)}. "
                           f"Got {x!r} instead.")
    return b


def _nm(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    try:
        return check_nm(v, "")
    except TypeError:
        raise _Invalid(TypeError) from None
    except ValueError:
        raise _Invalid(ValueError) from None


def _refine(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise _Invalid(TypeError)


def _chain(v: Any) -> float | str | None:
    if v is None or (isinstance(v, str) and v == "auto"):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise _Invalid(TypeError)
    try:
        v = float(v)
    except OverflowError:
        raise _Invalid(ValueError) from None
    if not 0.0 < v < 1.0:              # also refuses nan
        raise _Invalid(ValueError)
    return v


def _layers(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    globs = (v,) if isinstance(v, str) else v
    if not isinstance(globs, Iterable) or isinstance(globs, (bytes, Mapping)):
        raise _Invalid(TypeError)
    globs = tuple(globs)
    if not all(isinstance(g, str) for g in globs):
        raise _Invalid(TypeError)
    if not globs or not all(globs) or any("\0" in g for g in globs):
        raise _Invalid(ValueError)
    return globs


CONSTRAINTS: dict[str, Constraint] = {
    "block": Constraint("an int in [1, 65536], a pair (rows, cols) or a str like '32x16'",
                        _block, (0, -4, "4y4", (4, 0), 2.5, True, None)),
    "format": Constraint(f"one of {', '.join(map(repr, LAYOUT_FORMATS))}",
                         _choice(LAYOUT_FORMATS), ("csr", "", 3, None, "NM")),
    "nm": Constraint("None, or with format='nm' N:M with 1 <= N < M <= 64, as '2:4' or "
                     "(2, 4)", _nm, ("2:2", "4:2", "0:4", "2-4", (2, 4, 8), 2.5, "1:65",
                                     (2.0, 4), True)),
    "method": Constraint("a partitioner name with optional options, e.g. 'auto' or "
                         "'metis:graph=jaccard' (see regroup.list_partitioners()), or "
                         "with format='nm' an N:M search: "
                         f"{', '.join(map(repr, NM_METHODS))}",
                         _method, ("nope", "metis:colour=red", "metis:graph", 3, None)),
    "budget": Constraint("a Budget or a str 'iso', 'iso=F' (F in (0, 2**31]), "
                         "'density=D' (D in (0, 1]), 'blocks=K' (K an integer in "
                         "[1, 2**53]) or 'retained=R' (R in (0, 1])", _budget,
                         ("half", "density=2", "blocks=0", 0.5, None, "blocks=1e400",
                          "blocks=1e300", "blocks=inf", "iso=inf", "iso=1e400",
                          "iso=1e300", "iso=nan", Budget("blocks", float("inf")),
                          Budget("iso", float("nan")))),
    "budget_scope": Constraint(f"one of {', '.join(map(repr, BUDGET_SCOPES))}",
                               _choice(BUDGET_SCOPES), ("model", 1, None)),
    "layer_min": Constraint("a float in [0, 1]", _number(0.0, 1.0),
                            (-0.1, 1.5, float("nan"), "0.5", None, 10**400)),
    "seed": Constraint("an int in [0, 2**63 - 1]", _number(0, 2**63 - 1, integer=True),
                       (-1, 1.5, "0", None, 2**64)),
    "objective": Constraint(f"one of {', '.join(map(repr, OBJECTIVES))}",
                            _choice(OBJECTIVES), ("mass", 0, None)),
    "edge": Constraint(f"one of {', '.join(map(repr, EDGES))}", _choice(EDGES),
                       ("pad", None)),
    "refine": Constraint("None (auto: on for portfolio methods), True or False", _refine,
                         ("on", 1, 0.0)),
    "time_limit": Constraint("None or a number of seconds in (0, 1e9]",
                             _number(0.0, 1e9, low_open=True, optional=True),
                             (0, -1, float("inf"), float("nan"), "10", 1e400, 1e300,
                              10**400)),
    "anneal": Constraint("None or a number of seconds in (0, 1e6]",
                         _number(0.0, 1e6, low_open=True, optional=True),
                         (0, -2.0, float("inf"), "5", True, 1e300, 10**400)),
    "chain": Constraint("None, 'auto' or a float in (0, 1)", _chain,
                        (0, 0.0, 1, 1.0, -0.5, 2, float("nan"), float("inf"), "0.01", True,
                         10**400, "Auto")),
    "layers": Constraint("None, a glob over weight names, or a non-empty list of them",
                         _layers, ("", [], [""], [3], 3, b"x")),
    "dense_above": Constraint("a float in (0, 1]", _number(0.0, 1.0, low_open=True),
                              (0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "x", "0.9",
                               None, True)),
}


@dataclass(frozen=True)
class RegroupOptions:
    """How layers are regrouped; the same record for every entry point.

    Parameters
    ----------
    block : int, (int, int) or str, default=32
        Block shape ``br x bc`` (``"32x16"``); rows are output features. With
        ``format="nm"`` the block is the N:M group: leave it at its default (or give
        ``(1, M)``) and it is stored as ``(1, M)``; any other block is refused.
    format : {"grid", "shuffled", "nm"}, default="grid"
        grid: BSR after row and column permutations; shuffled: per-panel column tiles;
        nm: an input-column permutation and the N:M mask of the permuted weight
        (:mod:`regroup.nm`; rows are output features, the groups of M run along the input
        columns, as in hardware). N:M prunes what it is given: dense tensors are taken
        (the usual input, as for ASP), pruned ones too (an N:M mask of the surviving
        weights). The block-layout options (``block``, ``budget``, ``budget_scope``,
        ``layer_min``, ``refine``, ``anneal``, ``edge``) and ``dense_above`` do not apply
        to nm and must stay at their defaults (a value given is refused, never ignored);
        ``objective``, ``seed``, ``time_limit`` and ``layers`` do.
    nm : "N:M" or (int, int), optional
        The N:M pattern of ``format="nm"``: ``"2:4"`` (the default there), ``"1:4"``,
        ``"4:8"``, ``"2:8"``...; stored as ``(N, M)``. Refused with the other formats.
    method : str, default="auto"
        Partitioner, optionally with options: ``"metis:graph=jaccard"``. Stored in
        canonical form (options that differ from the defaults, sorted). With
        ``format="nm"``: ``"auto"`` (regroup's search, :func:`regroup.nm.nm_search`) or
        ``"asp"`` (the ASP baseline, :func:`regroup.nm.asp_search`, M <= 4); see
        :data:`regroup.nm.NM_METHODS`.
    params : mapping, optional
        Partitioner options merged into ``method`` (a convenience; after validation
        ``method`` carries them and ``params`` is None).
    budget : Budget or str, default="iso"
        ``"iso"``, ``"iso=F"``, ``"density=D"``, ``"blocks=K"`` or ``"retained=R"``.
    budget_scope : {"layer", "global"}, default="layer"
        ``"global"`` spends ``budget`` model-wide (:mod:`regroup.allocation`).
    layer_min : float in [0, 1], default=0
        With a global budget: share of each layer's own budget reserved for it.
    seed : int, default=0
        Seed of every random choice; recorded in results.
    objective : {"auto", "count", "magnitude"}, default="auto"
        What a kept block is worth; "auto" uses magnitudes when weights are known.
    edge : {"partial", "error"}, default="partial"
        Shapes not divisible by the block: short edge blocks, or an error.
    refine : bool or None, default=None
        Retained-mass local search; None: on for portfolio methods (auto) only.
    time_limit : float, optional
        Seconds per partitioner call (partitioners then run in a subprocess), and per
        refinement of a layout (which then depends on the machine's speed). With
        ``format="nm"``: seconds per layer's N:M search (in process; stopped at a round
        boundary, so the result then depends on the machine's speed too).
    anneal : float, optional
        Seconds of simulated annealing after refinement (:mod:`regroup.anneal`; its
        moves are counted by a work model, so the result is the same on every machine).
    chain : "auto", float in (0, 1) or None, default="auto"
        Models only (:func:`regroup.adapters.torch.regroup_model`, which traces the
        layer graph; the other entry points refuse a number). After every layer is planned,
        each is planned again, sparsest first, two passes, with the magnitudes of its
        weights on dead features multiplied by ``chain``: output rows that no consumer's
        kept blocks read, input columns that no producer's kept blocks write (through
        BatchNorm and depthwise convolutions, where such a feature is a constant). Kept
        blocks then gather on the features that flow through the network. ``0.01`` is
        the measured setting (MobileNetV2, top-1 agreement after recovery, three paired
        seeds: 0.45 at 90 % sparsity vs 0.26 without and 0.37 for DSB's grouping; 0.54
        vs 0.51 and 0.43 at 80 %; folded, 0.41 vs 0.03 at 90 % and 0.52 vs 0.35 at 80 %;
        ``benchmarks/README.md``). "auto" is :data:`CHAIN_AUTO` where it applies
        (``regroup_model`` with ``example_inputs``, ``budget_scope="layer"``, a block
        format) and None elsewhere; None plans each layer on its own (faster: chain
        re-plans the layers whose features die, as warm starts from their first plan,
        1.05-1.2x the planning time on MiniLM and MobileNetV2 at 80-90 % sparsity; with
        ``refine=False`` a re-plan only re-picks the blocks). The metrics'
        ``retained_magnitude`` stays in the layer's own units.
    layers : str or sequence of str, optional
        Globs over weight names (``"encoder.*"``, ``"fc1.weight"``); None: every layer.
        An entry that is a layer's exact name also selects an embedding table, which is
        otherwise skipped (:func:`regroup.io.embedding_name`).
    dense_above : float in (0, 1], default=0.95
        Tensors of a file or model whose density (kept fraction) is above this are not
        pruned layers and are skipped with the reason (1.0: only fully dense ones). See
        :data:`DENSE_ABOVE` for the default. A file and model selection field, like
        ``layers``: :func:`regroup.regroup_pattern` regroups the pattern it is given.
    """

    block: Any = 32
    format: str = "grid"
    nm: Any = None
    method: str = "auto"
    params: Mapping[str, Any] | None = None
    budget: Budget | str = "iso"
    budget_scope: str = "layer"
    layer_min: float = 0.0
    seed: int = 0
    objective: str = "auto"
    edge: str = "partial"
    refine: bool | None = None
    time_limit: float | None = None
    anneal: float | None = None
    chain: float | str | None = "auto"
    layers: Any = None
    dense_above: float = DENSE_ABOVE

    def __post_init__(self) -> None:
        values = _validate({f.name: getattr(self, f.name) for f in fields(self)},
                           "RegroupOptions")
        for k, v in values.items():
            object.__setattr__(self, k, v)

    # -- derived views ---------------------------------------------------------------
    @property
    def partitioner(self) -> tuple[str, dict[str, Any]]:
        """``(name, params)`` of :attr:`method`, every option resolved."""
        return parse_method(self.method)

    @property
    def portfolio(self) -> bool:
        """Whether the method is a portfolio (auto), which refines by default."""
        return bool(get_partitioner(self.partitioner[0]).portfolio)

    @property
    def refines(self) -> bool:
        """Whether the chosen layouts are refined (``refine``, or the method's default)."""
        return self.portfolio if self.refine is None else self.refine

    def per_layer(self) -> RegroupOptions:
        """These options for one layer's regrouping: the fields that select and budget a
        whole file or model (``layers``, ``dense_above``, ``budget_scope``,
        ``layer_min``; ``chain``, which plans a model's layers together) at defaults."""
        return dataclasses.replace(self, layers=None, dense_above=DENSE_ABOVE,
                                   budget_scope="layer", layer_min=0.0, chain=None)

    def record(self) -> dict[str, Any]:
        """The options as recorded in result files and reports (JSON types); ``nm`` only
        with ``format="nm"`` (so block-format records are as before the option existed)."""
        nm = {} if self.nm is None else {"nm": list(self.nm)}
        # "auto" (the default) is left out, so records of every other entry point are as
        # before the option; a model plan records what it became (a number or None).
        chain = {} if self.chain == "auto" or self.format == "nm" else {"chain": self.chain}
        return {"block": list(self.block), "format": self.format, **nm, "method": self.method,
                "budget": str(self.budget), "budget_scope": self.budget_scope,
                "layer_min": self.layer_min, "seed": self.seed,
                "objective": self.objective, "edge": self.edge, "refine": self.refine,
                "time_limit": self.time_limit, "anneal": self.anneal,
                "layers": None if self.layers is None else list(self.layers),
                "dense_above": self.dense_above, **chain}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RegroupOptions:
        """Rebuild the options recorded by :meth:`record` (unknown keys are ignored).

        A record without ``dense_above`` was written before the option existed, when only
        fully dense tensors were skipped: it reads as ``dense_above=1.0``."""
        names = {f.name for f in fields(cls)}
        values = {"dense_above": 1.0, **{k: v for k, v in record.items() if k in names}}
        return cls(**values)

    def replace(self, caller: str = "RegroupOptions.replace", **changes: Any
                ) -> RegroupOptions:
        """A copy with ``changes``, validated (errors name ``caller``).

        Leaving ``format="nm"`` for a block format drops what N:M set (``nm``, and the
        ``(1, M)`` group as ``block``) unless ``changes`` gives them."""
        if self.format == "nm" and changes.get("format", "nm") != "nm":
            changes = {"nm": None, "block": RegroupOptions.block, "chain": "auto", **changes}
        return resolve_options(self, caller, **changes)

    def require_blocks(self, caller: str, why: str) -> None:
        """Refuse ``format="nm"`` for ``caller``, an entry point that lays out blocks
        (``why`` says what it does): a ``ValueError`` naming the 'format' parameter."""
        if self.format == "nm":
            raise ValueError(f"The 'format' parameter of {caller} must be one of "
                             f"{', '.join(map(repr, FORMATS))}: {why}. Got 'nm' instead.")

    def refuse_chain(self, caller: str) -> None:
        """Refuse ``chain`` for ``caller``, an entry point that does not know a model's
        layer graph (only :func:`regroup.adapters.torch.regroup_model` does): a
        ``ValueError`` naming the 'chain' parameter."""
        if isinstance(self.chain, float):
            raise ValueError(f"The 'chain' parameter of {caller} must be None or 'auto': "
                             "it plans a model's layers by which features their neighbours' "
                             "kept blocks use, a layer graph only regroup_model traces. Got "
                             f"{self.chain!r} instead.")

    def named(self, name: str) -> bool:
        """Whether :attr:`layers` lists ``name`` itself (an entry equal to it, not only a
        glob matching it): the explicit request that overrides the embedding rule."""
        return self.layers is not None and name in self.layers

    def select(self, names: Sequence[str], where: str | None = None) -> list[str]:
        """The names matched by :attr:`layers` (all when None), in input order.

        With ``where`` (the file or model the names come from), a selection that matches
        nothing is a :class:`RegroupError` listing the names."""
        if self.layers is None:
            return list(names)
        out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.layers)]
        if not out and where is not None:
            shown = ", ".join(list(names)[:12]) + (" ..." if len(names) > 12 else "")
            globs = ", ".join(map(repr, self.layers))
            raise RegroupError(f"{where}: no layer matches {globs}; layers are: "
                               f"{shown or 'none'}")
        return out


_FIELDS = tuple(f.name for f in fields(RegroupOptions))
_DEFAULT_BLOCK = _block(RegroupOptions.block)


def _validate(values: dict[str, Any], caller: str) -> dict[str, Any]:
    out = dict(values)
    for name, c in CONSTRAINTS.items():
        try:
            out[name] = c.normalize(values[name])
        except _Invalid as bad:
            detail = f" ({bad.detail})" if bad.detail else ""
            raise bad.kind(f"The {name!r} parameter of {caller} must be {c.allowed}. Got "
                           f"{values[name]!r} instead.{detail}") from None
    _check_format(out, values, caller)
    params = values.get("params")
    if params is not None:
        if not isinstance(params, Mapping):
            raise TypeError(f"The 'params' parameter of {caller} must be a mapping of "
                            f"partitioner options. Got {params!r} instead.")
        try:
            out["method"] = format_method(*parse_method(out["method"], dict(params)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"The 'params' parameter of {caller} must hold options of "
                             f"partitioner {out['method']!r}. Got {dict(params)!r} "
                             f"instead. ({exc})") from None
        out["params"] = None
    return out


# The block-layout options and their defaults: with format="nm" they do not apply
# (nor the density rule: N:M takes dense tensors).
_BLOCK_ONLY = {"budget": Budget("iso"), "budget_scope": "layer", "layer_min": 0.0,
               "refine": None, "anneal": None, "edge": "partial", "dense_above": DENSE_ABOVE,
               "chain": None}


def _check_format(out: dict[str, Any], values: dict[str, Any], caller: str) -> None:
    """The options that depend on the format, in ``out`` (normalised) or refused naming
    the option and ``caller``: ``nm`` and the N:M methods go with format="nm" only, and
    the block-layout options stay at their defaults with it (``block`` becomes the N:M
    group, ``(1, M)``)."""
    def refuse(name: str, must: str) -> None:
        raise ValueError(f"The {name!r} parameter of {caller} must be {must}. Got "
                         f"{values[name]!r} instead.")

    if out["format"] != "nm":
        if out["nm"] is not None:
            refuse("nm", f"None with format={out['format']!r} (N:M applies to "
                   "format='nm' only)")
        if out["method"] in NM_METHODS and out["method"] not in list_partitioners():
            refuse("method", f"a partitioner name with format={out['format']!r} "
                   f"({out['method']!r} is an N:M search: it needs format='nm')")
        return
    nm = out["nm"] = NM_DEFAULT if out["nm"] is None else out["nm"]
    if values.get("params") is not None:
        refuse("params", "None with format='nm' (the N:M searches take no options)")
    if out["method"] not in NM_METHODS:
        refuse("method", f"one of {', '.join(map(repr, NM_METHODS))} with format='nm' "
               "(the N:M searches; 'auto' is regroup's)")
    problem = nm_method_problem(out["method"], nm)
    if problem:
        refuse("method", f"'auto' with format='nm' nm={nm[0]}:{nm[1]} ({problem})")
    if out["block"] not in (_DEFAULT_BLOCK, (1, nm[1])):
        refuse("block", f"left at its default with format='nm' (the N:M group, "
               f"1x{nm[1]}, is the block)")
    out["block"] = (1, nm[1])
    if out["chain"] == "auto":          # "auto" plans no chain for N:M
        out["chain"] = None
    for name, default in _BLOCK_ONLY.items():
        if out[name] != default:
            shown = repr(str(default) if isinstance(default, Budget) else default)
            refuse(name, f"{shown} (its default) with format='nm': it applies to the "
                   "block formats only")


def check_budget(value: Any, name: str, caller: str) -> Budget:
    """``value`` read as one budget under the ``budget`` constraint (its kind and range),
    or a ``ValueError``/``TypeError`` naming the parameter ``name`` of ``caller``: for
    entry points that take several budgets (``regroup sweep --budgets``)."""
    c = CONSTRAINTS["budget"]
    try:
        return c.normalize(value)
    except _Invalid as bad:
        detail = f" ({bad.detail})" if bad.detail else ""
        raise bad.kind(f"Each entry of the {name!r} parameter of {caller} must be "
                       f"{c.allowed}. Got {value!r} instead.{detail}") from None


def resolve_options(options: RegroupOptions | None, caller: str, **kwargs: Any
                    ) -> RegroupOptions:
    """The options an entry point runs with: ``options`` (default: all defaults) with the
    keyword arguments ``kwargs`` (field names) applied on top, validated once; errors
    name ``caller``."""
    if options is not None and not isinstance(options, RegroupOptions):
        raise TypeError(f"The 'options' parameter of {caller} must be a RegroupOptions. "
                        f"Got {type(options).__name__} instead.")
    unknown = sorted(set(kwargs) - set(_FIELDS))
    if unknown:
        raise TypeError(f"{caller} got unexpected keyword argument(s) "
                        f"{', '.join(map(repr, unknown))}; options are: {', '.join(_FIELDS)}")
    base = options if options is not None else RegroupOptions()
    if not kwargs:
        return base
    values = {f: getattr(base, f) for f in _FIELDS}
    values.update(kwargs)
    return RegroupOptions(**_validate(values, caller))
