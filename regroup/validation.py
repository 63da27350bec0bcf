"""Input validation and error types shared by the public API (the core and the adapters).

Validation happens once, at the public boundary. Messages name the parameter, the caller,
what was expected and what arrived; they describe data (shape, dtype, nnz), never print it.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import stat
from typing import Any, BinaryIO, Callable, Literal, overload

import numpy as np

__all__ = [
    "RegroupError",
    "FormatError",
    "PartitionerError",
    "check_int",
    "check_real",
    "check_choice",
    "check_block",
    "check_distinct_list",
    "is_permutation",
    "as_rng",
    "native_seed",
    "missing_dependency",
    "check_regular",
    "open_regular",
    "printable",
    "safe_filename",
]


class RegroupError(ValueError):
    """Base class of regroup's own errors about data, files and tools (everything the CLI
    reports as one line with exit code 1). A ValueError, so that code catching bad
    values catches bad data too; option errors are plain ValueError / TypeError."""


class FormatError(RegroupError):
    """A file could not be parsed; the message carries ``path:line:col`` where known."""


class PartitionerError(RegroupError, RuntimeError):
    """A partitioner crashed, exceeded its time limit, or returned an invalid grouping."""


@overload
def check_int(value: Any, name: str, caller: str, *, low: int | None = ...,
              high: int | None = ..., optional: Literal[False] = ...) -> int: ...
@overload
def check_int(value: Any, name: str, caller: str, *, low: int | None = ...,
              high: int | None = ..., optional: bool) -> int | None: ...
def check_int(value: Any, name: str, caller: str, *, low: int | None = None,
              high: int | None = None, optional: bool = False) -> int | None:
    """Return ``value`` as int (None passes when ``optional``) or raise
    ``TypeError``/``ValueError`` naming the parameter, the caller and the range."""
    if value is None and optional:
        return None
    if high is not None:
        want = f"an int in [{'-inf' if low is None else low}, {high}]"
    else:
        want = "an int" if low is None else f"an int >= {low}"
    want += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"The {name!r} parameter of {caller} must be {want}. "
                        f"Got {value!r} instead.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"The {name!r} parameter of {caller} must be {want}. "
                         f"Got {value!r} instead.")
    return value


@overload
def check_real(value: Any, name: str, caller: str, low: float = ..., high: float = ..., *,
               low_open: bool = ..., high_open: bool = ...,
               optional: Literal[False] = ...) -> float: ...
@overload
def check_real(value: Any, name: str, caller: str, low: float = ..., high: float = ..., *,
               low_open: bool = ..., high_open: bool = ..., optional: bool) -> float | None: ...
def check_real(value: Any, name: str, caller: str, low: float = -math.inf,
               high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
               optional: bool = False) -> float | None:
    """Return ``value`` as float (None passes when ``optional``) or raise
    ``TypeError``/``ValueError`` naming the parameter, the caller and the interval
    (``low_open``/``high_open`` exclude an end; NaN is always refused)."""
    if value is None and optional:
        return None
    if math.isinf(high) and not math.isinf(low):
        want = f"a {'finite ' if high_open else ''}float {'>' if low_open else '>='} {low:g}"
    elif math.isinf(low) and not math.isinf(high):
        want = f"a {'finite ' if low_open else ''}float {'<' if high_open else '<='} {high:g}"
    elif math.isinf(low):
        want = "a float"
    else:
        want = (f"a float in {'(' if low_open else '['}{low:g}, "
                f"{high:g}{')' if high_open else ']'}")
    want += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"The {name!r} parameter of {caller} must be {want}. "
                        f"Got {value!r} instead.")
    try:
        v = float(value)
    except OverflowError:                    # an int beyond the float range: 10**400
        v = math.inf if value > 0 else -math.inf
    if math.isnan(v) or v < low or v > high or (low_open and v == low) or \
            (high_open and v == high):
        raise ValueError(f"The {name!r} parameter of {caller} must be {want}. "
                         f"Got {value!r} instead.")
    return v


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


def is_permutation(perm: Any, n: int) -> bool:
    """Whether ``perm`` is a 1-D integer array holding each of ``0 .. n-1`` once."""
    arr = np.asarray(perm)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        return False
    if n == 0:
        return True
    if arr.min() < 0 or arr.max() >= n:
        return False
    seen = np.zeros(n, bool)
    seen[arr] = True
    return bool(seen.all())


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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str, what: str, mode: int) -> FormatError:
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    return FormatError(f"{path}: the {what} is {kind}, not a regular file; regroup reads "
                       "inputs from regular files only")


def check_regular(path: str | os.PathLike, what: str = "input") -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), refusing anything but a regular file with
    a :class:`FormatError` naming it and ``what`` it is: the file is not opened, so a
    FIFO, device or socket never blocks nor is touched.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    RegroupError
        ``path`` is a directory, a FIFO, a device or a socket.
    """
    text = os.fspath(path)
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"{text}: no such file") from None
    except (OSError, ValueError) as exc:      # a loop of links, a NUL byte, no permission
        raise RegroupError(f"{text}: the {what} cannot be read "
                           f"({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(text, what, st.st_mode)
    return st


def open_regular(path: str | os.PathLike, what: str = "input") -> BinaryIO:
    """``path`` opened for binary reading, checked to be a regular file first without
    opening it (:func:`check_regular`) and then through the handle itself (opened
    non-blocking, so a file swapped for a FIFO in between never blocks)."""
    text = os.fspath(path)
    check_regular(text, what)
    fd = os.open(text, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(text, what, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _escape(ch: str) -> str:
    code = ord(ch)
    return (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
            else f"\\U{code:08x}")


def printable(text: Any) -> str:
    """``text`` safe to print on a terminal: every character that is not printable
    (control characters such as ESC, NUL and newlines, bidirectional overrides and other
    format characters, separators other than the space) is written as a Python escape
    (``\\x1b``, ``\\u202e``), so a tensor name can neither move the cursor, recolour the
    screen nor hide text. Printable text is returned unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_FILENAME = 200     # bytes of a file name made from a tensor name, before its suffix


def safe_filename(name: str) -> str:
    """A file name for the tensor ``name``, the same on every file system: letters,
    digits, ``.``, ``_`` and ``-`` are kept and every other byte of its UTF-8 encoding
    (``/``, ``\\``, NUL, control characters, ``%`` itself) is written ``%XX``, so distinct
    names give distinct file names (``"a/b"`` -> ``a%2Fb``, ``"a_b"`` stays ``a_b``; on a
    case-insensitive file system names differing only in case still meet: callers that
    write several files check that too); a name
    that would encode longer than :data:`MAX_FILENAME` bytes is cut and ends with ``~``
    and 16 hex digits of its SHA-256 (``~`` never appears otherwise). ``""``, ``"."`` and
    ``".."`` are encoded whole (``%2E%2E``; ``""`` is ``%``), never a directory name."""
    raw = name.encode("utf-8", "surrogatepass")
    if name in ("", ".", ".."):       # "%" alone is no other name's encoding
        return "".join(f"%{b:02X}" for b in raw) or "%"
    out = "".join(chr(b) if chr(b) in _SAFE_CHARS else f"%{b:02X}" for b in raw)
    if len(out) > MAX_FILENAME:
        out = out[:MAX_FILENAME - 17] + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return out
