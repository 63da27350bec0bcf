"""Output paths, checked before any work so that no run loses data through them.

Every command and API entry point that writes files checks its outputs here first
(:func:`check_outputs`), and every write checks its own target again
(:func:`check_output`, through :func:`regroup._atomic.atomic_write`):

- an output is a regular file or does not exist yet, in an existing directory: a device
  (``/dev/null``), a FIFO, a socket, a directory (``-o .``) or a symbolic link to one of
  those is refused, since an atomic rename would replace it with a regular file;
- an output is never an input nor another output of the same call (resolved paths, and
  ``os.path.samefile`` when both exist, so symbolic and hard links count);
- a result file replaces an existing file only when that file is a regroup result (the
  same command run again), unless ``force`` (``--force``) says so.

The parts directory of a streamed run (``OUT.parts``) is claimed here too
(:class:`PartsDir`): created with an ownership marker, locked for the whole run, and never
used, deleted or written through when regroup did not create it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

from .validation import RegroupError

__all__ = ["check_output", "check_outputs", "same_file", "default_output", "PartsDir",
           "PARTS_MARKER"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))
_KERNEL_DIRS = ("/dev/", "/proc/", "/sys/")
_EXPECTED = "a regular file or a new file in an existing directory"


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _refuse(name: str, caller: str, path: str, why: str, expected: str = _EXPECTED):
    return RegroupError(f"The {name!r} parameter of {caller} must be {expected}. "
                        f"Got {path!r} ({why}) instead.")


def check_output(path: str | os.PathLike, name: str = "path",
                 caller: str = "regroup") -> str:
    """Return the real path to write ``path`` to, or raise :class:`RegroupError` naming
    ``name`` (the parameter or option) and ``caller`` when it is not a regular file nor a
    new file in an existing directory. A symbolic link to a regular file resolves to its
    target, which is then written (the link stays)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise _refuse(name, caller, text, "an empty path")
    if text.endswith(("/", os.sep)):
        raise _refuse(name, caller, text, "a directory name")
    try:
        st = os.stat(text)
    except FileNotFoundError:
        if os.path.islink(text):
            raise _refuse(name, caller, text, "a symbolic link to a missing file") from None
        st = None
    except NotADirectoryError:
        raise _refuse(name, caller, text, "a path through a file, not a directory") from None
    except OSError as exc:              # a loop of links, a path too long, no permission
        raise _refuse(name, caller, text, exc.strerror or type(exc).__name__) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        link = "a symbolic link to " if os.path.islink(text) else ""
        raise _refuse(name, caller, text, link + _kind(st.st_mode))
    real = os.path.realpath(text)
    # /dev/stdout is a link to whatever this process's stdout is, a regular file too when
    # redirected: a kernel file system is never a place to write a result to.
    for where in (os.path.abspath(text), real):
        if where.startswith(_KERNEL_DIRS):
            top = "/" + where.split("/")[1]
            raise _refuse(name, caller, text, f"a file in {top}, a kernel file system")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        shown = os.path.dirname(os.path.abspath(text))
        raise _refuse(name, caller, text, f"its directory {shown} does not exist")
    return real


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same real path, or the same inode (a hard
    link) when both exist."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _is_result(path: str) -> bool:
    """Whether ``path`` is a regroup result file (a zip archive holding ``meta.json``);
    only the archive's directory is read."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "meta.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], caller: str, *,
                  inputs: Mapping[str, str | os.PathLike | None] | None = None,
                  results: Collection[str] = (), directories: Collection[str] = (),
                  force: bool = False) -> dict[str, str]:
    """Check every output of one call before any work; return their real paths.

    Parameters
    ----------
    outputs : mapping of parameter name to path
        As the caller names them (``"-o"``, ``"--report"`` in the CLI; ``"out"`` in the
        API); None values (an output not asked for) are ignored.
    caller : str
        ``"regroup run"``, ``"regroup_checkpoint"``, ...: named in the errors.
    inputs : mapping of parameter name to path, optional
        Files the call reads: no output may be one of them.
    results : collection of str
        Outputs that are result files: an existing file there is replaced only when it
        is a regroup result file, or with ``force``.
    directories : collection of str
        Outputs that are directories (created if missing; files are written inside).
    force : bool
        Replace an existing file that is not a regroup result at a ``results`` output
        (``--force`` in the CLI, ``force=True`` in the API).

    Raises
    ------
    RegroupError
        Naming the parameter, the caller, what is expected and the path given.
    """
    resolved: dict[str, str] = {}
    for name, path in outputs.items():
        if path is None:
            continue
        text = os.fsdecode(os.fspath(path))
        if name in directories:
            if os.path.lexists(text) and not os.path.isdir(text):
                try:
                    why = _kind(os.stat(text).st_mode)
                except OSError as exc:
                    why = exc.strerror or type(exc).__name__
                why = "a regular file" if why == "not a regular file" else why
                raise _refuse(name, caller, text, why, "a directory or a new one")
            resolved[name] = os.path.realpath(text)
        else:
            resolved[name] = check_output(text, name, caller)
        for iname, ipath in (inputs or {}).items():
            if ipath is not None and same_file(text, ipath):
                raise _refuse(name, caller, text, f"the same file as {iname} {os.fspath(ipath)!r}",
                              "a file other than the input")
        if (name in results and not force and os.path.exists(text)
                and not _is_result(text)):
            hint = "--force" if name.startswith("-") else "force=True"
            raise _refuse(name, caller, text, f"an existing file that is not a regroup result; "
                          f"{hint} replaces it", "a new file or a regroup result file")
    names = list(resolved)
    for i, a in enumerate(names):
        for b in names[:i]:
            if same_file(resolved[a], resolved[b]) or resolved[a] == resolved[b]:
                raise RegroupError(f"The {b!r} and {a!r} parameters of {caller} must name "
                                   f"different files. Got {os.fspath(outputs[b])!r} and "
                                   f"{os.fspath(outputs[a])!r}, the same file, instead.")
    return resolved


def default_output(path: str | os.PathLike) -> str:
    """The result file a run writes when none is given: the input's whole name (a file or
    a directory) followed by ``.regroup.npz``, in the current directory, so that inputs
    differing only in a suffix (``model.npy``, ``model.npz``) never share one."""
    name = Path(os.path.abspath(os.fspath(path))).name or "regroup"
    return f"{name}.regroup.npz"


PARTS_MARKER = ".regroup-parts"
_MARKER_TEXT = (b"regroup parts directory: finished layers of an interrupted run, kept to "
                b"resume it (rerun the same command); safe to delete when no run is going\n")


class PartsDir:
    """The parts directory ``OUT.parts`` of a streamed run, owned and locked by this run.

    :meth:`claim` creates it with an ownership marker (:data:`PARTS_MARKER`), or reuses
    one regroup created (an interrupted run's, to resume it), and holds an exclusive lock
    on the marker until :meth:`discard` or :meth:`keep`: a second run writing the same
    output fails at once instead of mixing its layers in. A directory without the marker
    or a symbolic link is refused, never deleted nor written through.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def claim(cls, out: str | os.PathLike) -> PartsDir:
        """Create or reuse, and lock, ``OUT.parts`` (``out`` the result file's real path);
        raise :class:`RegroupError` naming it when regroup did not create it or another run
        holds it."""
        path = Path(os.fspath(out) + ".parts")
        try:
            os.mkdir(path)
            created = True
        except FileExistsError:
            created = False
        if not created:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
                        if stat.S_ISREG(st.st_mode) else _kind(st.st_mode))
                raise cls._foreign(path, what)
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
        if created:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path / PARTS_MARKER, flags, 0o666)
        except OSError:
            raise cls._foreign(path, f"a directory without the {PARTS_MARKER} marker") \
                from None
        try:
            cls._lock(fd, path)
            if created:
                os.write(fd, _MARKER_TEXT)
            elif (not stat.S_ISREG(os.fstat(fd).st_mode)
                  or os.read(fd, len(_MARKER_TEXT) + 1) != _MARKER_TEXT):
                raise cls._foreign(path, f"a directory whose {PARTS_MARKER} is not regroup's")
        except BaseException:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(path / PARTS_MARKER)
                    os.rmdir(path)
            raise
        return cls(path, fd)

    @staticmethod
    def _foreign(path: Path, what: str) -> RegroupError:
        return RegroupError(f"{path}: {what}, not a parts directory regroup created; it is "
                            "neither used nor deleted: move it away or choose another output")

    @staticmethod
    def _lock(fd: int, path: Path) -> None:
        try:
            import fcntl
        except ImportError:         # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegroupError(f"{path}: another regroup run is writing the same output (it "
                               "holds this parts directory's lock); let it finish or choose "
                               "another output") from None

    def discard(self) -> None:
        """Remove the directory and every part in it, then release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._close()

    def keep(self) -> None:
        """Keep the parts for a rerun to resume from (the directory is removed when it
        holds none), then release the lock."""
        with contextlib.suppress(OSError):
            if set(os.listdir(self.path)) <= {PARTS_MARKER}:
                os.unlink(self.path / PARTS_MARKER)
                os.rmdir(self.path)
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
