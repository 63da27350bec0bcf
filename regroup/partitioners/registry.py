"""The partitioner registry: name -> spec, and method strings ("name:key=value,...")."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from ..validation import check_choice

__all__ = [
    "PartitionerSpec",
    "register",
    "get_partitioner",
    "list_partitioners",
    "available_partitioners",
    "parse_method",
    "format_method",
]


@dataclass(frozen=True)
class PartitionerSpec:
    """What a partitioner is, needs and promises.

    Attributes
    ----------
    name : str
    func : callable or None
        ``func(X, size, *, rng, **params) -> perm``; None for a portfolio.
    params : dict
        Accepted parameters with their defaults (types are taken from the defaults).
    requires : tuple of str
        Importable modules it needs.
    deterministic : bool
        Same input and seed give the same output.
    isolated : bool
        Always run in a subprocess (the native library may kill its host process).
    portfolio : tuple of str
        Method specs tried by a portfolio partitioner.
    description : str
    columns : {"home", "self"}
        Grid format column order: "home" groups columns by the row panel holding most of
        their mass (:func:`regroup.columns.group_columns`); "self" applies the partitioner
        to the columns too (identity and random, which must stay baselines).
    choices : dict
        Allowed values of string parameters.
    failures : tuple of exception types
        The failures the partitioner's library documents (a native error, running out of
        memory). :func:`regroup.partitioners.run_partitioner` reports them as a
        :class:`PartitionerError`, which a portfolio survives; anything else is a bug and
        propagates as it is.
    """

    name: str
    func: Callable[..., Any] | None
    params: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    deterministic: bool = True
    isolated: bool = False
    portfolio: tuple[str, ...] = ()
    description: str = ""
    columns: str = "home"
    choices: dict[str, tuple] = field(default_factory=dict)
    failures: tuple[type[BaseException], ...] = (MemoryError,)


_REGISTRY: dict[str, PartitionerSpec] = {}


def register(spec: PartitionerSpec) -> PartitionerSpec:
    """Add a partitioner to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"partitioner {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_partitioners() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def available_partitioners() -> list[str]:
    """Registered names whose dependencies are importable (checked without importing)."""
    return [n for n in list_partitioners()
            if all(importlib.util.find_spec(r) is not None for r in _REGISTRY[n].requires)]


def get_partitioner(name: str) -> PartitionerSpec:
    """The spec registered under ``name``; an unknown name lists every valid one."""
    check_choice(name, "method", "get_partitioner", set(_REGISTRY))
    return _REGISTRY[name]


def _coerce(value: str, default: Any, key: str, name: str):
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
    elif isinstance(default, int) or default is None and value.lstrip("-").isdigit():
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            pass
    else:
        return value
    raise ValueError(f"The {key!r} option of partitioner {name!r} must be of type "
                     f"{type(default).__name__}. Got {value!r} instead.")


def parse_method(method: str, params: dict[str, Any] | None = None) -> tuple[str, dict]:
    """Split ``"name:key=value,key=value"`` into a name and validated parameters.

    Explicit ``params`` override those in the string. Unknown names or keys raise
    ``ValueError`` listing the valid ones.
    """
    if not isinstance(method, str):
        raise TypeError(f"The 'method' parameter must be a str. Got {method!r} instead.")
    name, _, rest = method.partition(":")
    spec = get_partitioner(name.strip())
    merged: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {method!r} must look like key=value")
        merged[key.strip()] = value.strip()
    merged.update(params or {})
    out = dict(spec.params)
    for key, value in merged.items():
        if key not in spec.params:
            valid = ", ".join(sorted(spec.params)) or "none"
            raise ValueError(f"partitioner {spec.name!r} has no option {key!r}; valid options: "
                             f"{valid}")
        if isinstance(value, str):
            value = _coerce(value, spec.params[key], key, spec.name)
        if key in spec.choices:
            check_choice(value, key, f"partitioner {spec.name!r}", set(spec.choices[key]))
        out[key] = value
    return spec.name, out


def format_method(name: str, params: dict[str, Any]) -> str:
    """Inverse of :func:`parse_method`, listing only non-default parameters."""
    defaults = get_partitioner(name).params
    extra = [f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k) != v]
    return name + (":" + ",".join(extra) if extra else "")
