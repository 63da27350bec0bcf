"""Input validation and error types shared by the public API.

Validation happens once, at the public boundary. Messages name the parameter, the caller,
what was expected and what arrived; they describe data (shape, dtype, nnz), never print it.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np

__all__ = [
    "RegroupError",
    "FormatError",
    "PartitionerError",
    "check_int",
    "check_choice",
    "check_block",
    "check_distinct_list",
    "as_rng",
    "native_seed",
    "missing_dependency",
]


class RegroupError(ValueError):
    """Base class of regroup's own errors about data, files and tools (everything the CLI
    reports as one line with exit code 1). A ValueError, so that code catching bad
    values catches bad data too; option errors are plain ValueError / TypeError."""


class FormatError(RegroupError):
    """A file could not be parsed; the message carries ``path:line:col`` where known."""


class PartitionerError(RegroupError, RuntimeError):
    """A partitioner crashed, exceeded its time limit, or returned an invalid grouping."""


def check_int(value: Any, name: str, caller: str, *, low: int | None = None,
              high: int | None = None) -> int:
    """Return ``value`` as int or raise ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"The {name!r} parameter of {caller} must be an int. "
                        f"Got {value!r} instead.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"The {name!r} parameter of {caller} must be an int in "
                         f"[{lo}, {hi}]. Got {value!r} instead.")
    return value


def check_choice(value: Any, name: str, caller: str, options) -> str:
    """Return ``value`` if it is one of ``options``, else raise a ``ValueError`` listing them."""
    if value not in options:
        opts = ", ".join(repr(o) for o in sorted(options))
        raise ValueError(f"The {name!r} parameter of {caller} must be one of {opts}. "
                         f"Got {value!r} instead.")
    return value


def check_block(block: Any, caller: str) -> tuple[int, int]:
    """Normalise ``block`` (int, ``(br, bc)`` or ``"32x16"``) to a pair of positive ints."""
    if isinstance(block, str):
        parts = block.lower().split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) not in (1, 2):
            raise ValueError(f"The 'block' parameter of {caller} must look like '32' or "
                             f"'32x16'. Got {block!r} instead.")
        block = vals[0] if len(vals) == 1 else tuple(vals)
    if isinstance(block, numbers.Integral) and not isinstance(block, bool):
        block = (int(block), int(block))
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"The 'block' parameter of {caller} must be an int or a pair "
                        f"(rows, cols). Got {block!r} instead.")
    br = check_int(block[0], "block", caller, low=1, high=1 << 16)
    bc = check_int(block[1], "block", caller, low=1, high=1 << 16)
    return br, bc


def check_distinct_list(value: Any, name: str, caller: str, allowed: str,
                        parse: Callable[[Any], Any], single: tuple[type, ...] = ()
                        ) -> tuple[Any, ...]:
    """Read a non-empty list of distinct entries: a comma-separated str, a list or tuple,
    or one instance of a ``single`` type. Each entry goes through ``parse`` (which raises
    ``TypeError``/``ValueError``); duplicates are judged after parsing. Errors name the
    parameter, the caller, ``allowed`` and the value given."""
    def fail(kind: type[Exception], why: str = "") -> Exception:
        return kind(f"The {name!r} parameter of {caller} must be {allowed}. Got "
                    f"{value!r} instead.{why}")
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",")]
    elif single and isinstance(value, single):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"The {name!r} parameter of {caller} must be {allowed}. Got "
                        f"{type(value).__name__} instead.")
    out: list[Any] = []
    for item in items:
        try:
            parsed = parse(item)
        except (TypeError, ValueError) as exc:
            raise fail(type(exc), f" (entry {item!r}: {exc})") from None
        if parsed in out:
            raise fail(ValueError, f" ({str(parsed)!r} is given twice)")
        out.append(parsed)
    if not out:
        raise fail(ValueError)
    return tuple(out)


def as_rng(rng: Any) -> np.random.Generator:
    """Normalise ``rng`` like SciPy: a Generator passes through, anything else seeds one.

    ``None`` is refused on purpose: every result records its seed, so a seed is required.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise TypeError("regroup needs an explicit seed (an int or a numpy Generator); "
                        "Got None instead.")
    return np.random.default_rng(rng)


def native_seed(rng: np.random.Generator) -> int:
    """Draw one 31-bit integer seed for a native library call."""
    return int(rng.integers(0, 2**31 - 1))


def missing_dependency(package: str, caller: str, pip_name: str | None = None) -> ImportError:
    """The ``ImportError`` raised when an optional dependency is absent."""
    pip_name = pip_name or package
    return ImportError(f"{caller} requires {package}. You can install it with "
                       f"`pip install {pip_name}`.")
