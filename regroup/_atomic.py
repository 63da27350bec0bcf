"""Atomic file writes: a temporary file beside the target, renamed over it on success."""
from __future__ import annotations

import contextlib
import os
import secrets

from ._outputs import check_output

__all__ = ["atomic_write"]


def _create_beside(target: str) -> tuple[int, str]:
    """Create a new temporary file beside ``target``. Created with mode 0o666, as
    ``open()`` does, so the umask (and a default ACL) decide the result's permissions
    (``mkstemp`` would give 0o600, and a fixed chmod would ignore the umask)."""
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{target}: no free temporary name beside it")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, name: str = "path",
                 caller: str = "atomic_write"):
    """Yield a file object; on success it replaces ``path``, on any error nothing is left.

    ``path`` must be a regular file or a new file in an existing directory
    (:func:`regroup._outputs.check_output`; ``name`` and ``caller`` are named in the
    error); a symbolic link to a file is followed, so the link stays and its target is
    replaced. The new file's permissions follow the umask.
    """
    target = check_output(path, name, caller)
    fd, tmp = _create_beside(target)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
