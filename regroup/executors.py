"""Where the layers of a run are computed: in process, in worker processes, or on dask.

:func:`execute` calls ``fn(*task, threads=...)`` for every task and yields
``(task index, value)`` as tasks finish. Every task depends only on its own input and
the seed, so the order of completion never changes a result. Workers get the largest
tasks first (by ``costs``), so that no worker ends alone with a big layer.

A dask scheduler given by address must answer within dask's connect timeout
(``distributed.comm.timeouts.connect``, default 30 s; set it with the environment variable
``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=10s``): one that accepts the connection and
never answers, or answers with something other than dask's protocol, is a
:class:`RegroupError` naming the address, never a hang.

Worker processes never import from the current directory: on Python >= 3.11 through
``PYTHONSAFEPATH``; on 3.10, where that variable does not exist, the interpreters that
multiprocessing starts (spawned workers, dask's nannies' workers, the resource tracker) run
in isolated mode (``-I``), and take this process's import path once started.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .validation import RegroupError, missing_dependency

__all__ = ["ENGINES", "execute", "capped_threads", "thread_limit", "THREADS_VARIABLE",
           "exit_with_parent", "child_sys_path", "connect_scheduler", "connect_timeout"]

ENGINES = ("local", "dask")
_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("regroup_threads",
                                                                     default=None)


# A partitioner's subprocess (--time-limit) inherits its parent's cap through this.
THREADS_VARIABLE = "REGROUP_THREADS"
# Seconds past dask's connect timeout before a scheduler that has not answered is given up.
CONNECT_GRACE = 2.0


def thread_limit() -> int:
    """The threads one task may use: the cap of :func:`capped_threads` when a worker runs
    under one (or the cap its parent process passed in ``REGROUP_THREADS``), else every
    core. Native libraries with their own pools (Mt-KaHyPar's) size them by it."""
    inherited = os.environ.get(THREADS_VARIABLE, "")
    return (_THREADS.get() or (int(inherited) if inherited.isdigit() else 0)
            or os.cpu_count() or 1)


def capped_threads(fn: Callable[..., Any], *args: Any, threads: int | None = None) -> Any:
    """``fn(*args)`` with the BLAS / OpenMP thread pools capped at ``threads`` (workers
    sharing the cores; None: no cap), through threadpoolctl, and :func:`thread_limit`
    returning it for the libraries threadpoolctl does not reach."""
    if threads is None:
        return fn(*args)
    from threadpoolctl import threadpool_limits
    token = _THREADS.set(threads)
    try:
        with threadpool_limits(limits=threads):
            return fn(*args)
    finally:
        _THREADS.reset(token)


def exit_with_parent(parent: int, kernel: bool = True) -> None:
    """End this process (a worker) when process ``parent`` ends, even by ``kill -9``: a
    worker left behind would go on computing and writing parts for no one.

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    it fires when the parent's *thread* that started this process ends, so ``kernel`` is
    False when that was not the main thread. Otherwise a daemon thread checks the parent
    every half second."""
    if kernel and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal
            libc = ctypes.CDLL(None, use_errno=True)
            kernel = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            kernel = False
    else:
        kernel = False
    if os.getppid() != parent:          # it died before the watch began
        os._exit(1)
    if not kernel:
        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(0.5)
            os._exit(1)
        threading.Thread(target=watch, name="regroup-parent-watch", daemon=True).start()


def child_sys_path() -> list[str]:
    """This process's import path without the entries that mean "the current directory"
    (``''``): what a child process of regroup imports from, so that a ``json.py`` or
    ``pickle.py`` where the command is run is never imported by it."""
    return [p for p in sys.path if isinstance(p, str) and p]


@contextlib.contextmanager
def _no_cwd_imports() -> Iterator[None]:
    """While worker processes start: ``PYTHONSAFEPATH`` (Python >= 3.11) keeps the
    ``python -c`` bootstrap of a spawned worker (and of multiprocessing's resource
    tracker) from putting the current directory first on its path before it takes this
    process's path; the variable is restored afterwards, so this process's later children
    are not affected. Python 3.10 ignores the variable: there the interpreters
    multiprocessing starts get ``-I`` (:func:`_isolated_interpreters`)."""
    old = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        with _isolated_interpreters() if sys.version_info < (3, 11) else \
                contextlib.nullcontext():
            yield
    finally:
        if old is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = old


@contextlib.contextmanager
def _isolated_interpreters() -> Iterator[None]:
    """Python 3.10: the interpreters multiprocessing starts (spawned workers, the resource
    tracker, a forkserver: all through ``multiprocessing.util._args_from_interpreter_flags``)
    get ``-I``, so their ``-c`` bootstrap, which imports pickle, socket, subprocess ... before
    it takes this process's ``sys.path``, never finds them in the current directory. Once
    started, a spawned worker's path is this process's (multiprocessing's ``prepare``), so
    ``-I`` ignoring ``PYTHONPATH`` does not matter."""
    import multiprocessing.util as mp_util
    original = mp_util._args_from_interpreter_flags

    def isolated_flags() -> list[str]:
        flags = original()
        return flags if "-I" in flags else ["-I", *flags]

    mp_util._args_from_interpreter_flags = isolated_flags
    try:
        yield
    finally:
        mp_util._args_from_interpreter_flags = original


def _largest_first(costs: Sequence[int]) -> list[int]:
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def execute(fn: Callable[..., Any], tasks: Sequence[tuple], *, jobs: int = 1,
            engine: str = "local", scheduler: str | None = None,
            costs: Sequence[int] | None = None, labels: Sequence[str] | None = None,
            where: str = "") -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(*tasks[index]))`` as tasks finish.

    ``jobs`` worker processes (``engine="local"``; 1: in this process, in order), or a
    dask.distributed cluster (``engine="dask"``, ``scheduler`` its address; None starts
    a local one with ``jobs`` workers). ``labels`` name the tasks and ``where`` the
    input in the error raised when a worker process dies.
    """
    costs = list(costs) if costs is not None else [0] * len(tasks)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(tasks))]
    if engine == "dask":
        yield from _execute_dask(fn, tasks, jobs, scheduler, costs, labels, where)
        return
    if jobs == 1 or len(tasks) <= 1:
        for i, t in enumerate(tasks):
            try:
                value = fn(*t)
            except Exception as exc:
                _name_the_task(exc, where, labels[i])
                raise
            yield i, value
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    threads = max(1, (os.cpu_count() or 1) // jobs)
    order = _largest_first(costs)
    # "spawn": workers never inherit the parent's threads (BLAS, torch) mid-state. They end
    # with this process, and they are all started by the submissions below (a spawning pool
    # starts workers as tasks arrive, never later without max_tasks_per_child).
    main = threading.current_thread() is threading.main_thread()
    with _no_cwd_imports():
        ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=exit_with_parent, initargs=(os.getpid(), main))
        try:
            futures = {ex.submit(capped_threads, fn, *tasks[i], threads=threads): i
                       for i in order}
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    with ex:
        try:
            for fut in cf.as_completed(futures):
                try:
                    value = fut.result()
                except cf.process.BrokenProcessPool:
                    # Which worker died is not reported; the pool hands tasks out in
                    # ``order``, at most jobs + 1 at a time, so it ran one of these.
                    ok = {i for f, i in futures.items()
                          if f.done() and not f.cancelled() and f.exception() is None}
                    suspects = [labels[i] for i in order if i not in ok]
                    raise _worker_died(where, suspects[:jobs + 1]) from None
                except Exception as exc:
                    _name_the_task(exc, where, labels[futures[fut]])
                    raise
                yield futures[fut], value
        except BaseException:
            for fut in futures:
                fut.cancel()
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def _name_the_task(exc: BaseException, where: str, label: str) -> None:
    """Say which layer an unexpected error came from (regroup's own errors name it), as a
    note (``__notes__``, which Python 3.10 has no ``add_note`` for)."""
    if not isinstance(exc, RegroupError):
        note = f"{where}: while regrouping layer {label!r}"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def _worker_died(where: str, layers: list[str]) -> RegroupError:
    named = ", ".join(map(repr, layers[:6])) + (f" (and {len(layers) - 6} more)"
                                                 if len(layers) > 6 else "")
    return RegroupError(
        f"{where}: a worker process died while regrouping "
        f"{'layer' if len(layers) == 1 else 'one of the layers'} {named} "
        "(killed for memory, or a crash in native code); "
        "finished layers are kept: rerun to resume, with fewer --jobs if memory ran out or "
        "--time-limit to run each partitioner in its own process")


def _execute_dask(fn, tasks, jobs, scheduler, costs, labels, where):
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise missing_dependency("distributed", "engine 'dask'") from None
    # A local cluster's nannies may restart a worker at any time: no current-directory
    # imports while it lives.
    with _no_cwd_imports() if scheduler is None else contextlib.nullcontext():
        yield from _run_on_dask(fn, tasks, jobs, scheduler, costs, labels, where)


def connect_timeout() -> float:
    """Seconds a dask scheduler has to answer: dask's ``distributed.comm.timeouts.connect``
    (default 30 s; ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT`` in the environment)."""
    import dask
    from dask.utils import parse_timedelta
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))


def connect_scheduler(address: str, where: str = "") -> Any:
    """A ``distributed.Client`` connected to the scheduler at ``address``, or a
    :class:`RegroupError` naming the address within :func:`connect_timeout` seconds (plus
    ``CONNECT_GRACE``).

    distributed's own timeout covers the TCP connection but not every read of its
    handshake: a server that accepts and never answers kept ``Client()`` waiting forever,
    and one that answers with other bytes raised ValueError or a MemoryError (frame sizes
    read from garbage). The client is therefore started in a daemon thread that is given
    up on at the deadline; every failure becomes a RegroupError."""
    from distributed import Client
    timeout = connect_timeout()
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            box["client"] = Client(address, timeout=timeout)
        except BaseException as exc:   # reported below, in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=start, name="regroup-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout + CONNECT_GRACE)
    prefix = f"{where}: " if where else ""
    if thread.is_alive():
        raise RegroupError(
            f"{prefix}dask scheduler {address!r} did not answer within {timeout:g} s "
            "(it accepted the connection, or is unreachable); check the --scheduler address, "
            "or raise dask's distributed.comm.timeouts.connect "
            "(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT)")
    error = box.get("error")
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    if error is not None:
        raise RegroupError(f"{prefix}cannot use dask scheduler {address!r}: "
                           f"{type(error).__name__}: {error}") from None
    return box["client"]


def _run_on_dask(fn, tasks, jobs, scheduler, costs, labels, where):
    from distributed import Client, KilledWorker, LocalCluster, as_completed
    cluster = None
    threads = None
    if scheduler is None:
        import dask
        # Worker processes (one task at a time each), as a real cluster's would be. With
        # no dashboard to show them, the workers' statistical profiles (a stack sample
        # every 10 ms) would only take time from the layers.
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        threads = max(1, (os.cpu_count() or 1) // jobs)
    client = Client(cluster) if scheduler is None else connect_scheduler(scheduler, where)
    try:
        order = _largest_first(costs)
        futures = [client.submit(capped_threads, fn, *tasks[i], threads=threads,
                                 key=f"regroup-{fn.__name__}-{i}-{os.getpid()}-{id(tasks)}",
                                 pure=False, priority=len(order) - rank)
                   for rank, i in enumerate(order)]
        index = {f.key: i for f, i in zip(futures, order)}
        for fut in as_completed(futures):
            try:
                value = fut.result()
            except KilledWorker:
                # The scheduler retried it on other workers first; tasks queued on a dying
                # worker are suspected with the one it ran, so all known ones are named.
                killed = [labels[index[f.key]] for f in futures
                          if f.status == "error" and isinstance(f.exception(), KilledWorker)]
                raise _worker_died(where, killed) from None
            except Exception as exc:
                _name_the_task(exc, where, labels[index[fut.key]])
                raise
            yield index[fut.key], value
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
