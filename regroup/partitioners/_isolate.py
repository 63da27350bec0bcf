"""Run a partitioner (or any array-returning function of regroup) in a child process.

Native partitioners can hang, crash, or (the kahypar wheel) call ``exit()`` inside the host
process. The child reads the matrix and the call from a temporary folder and writes the
array back; the parent turns every failure into a :class:`PartitionerError` that names
the partitioner and the cause.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..validation import PartitionerError
from ..executors import THREADS_VARIABLE, child_sys_path, thread_limit

__all__ = ["run_isolated", "call_isolated"]

# The child's first statement replaces its import path by this process's (argv[3:]): with
# ``python -c`` (or ``-m``) the current directory would come first, and a ``json.py`` or
# ``pickle.py`` there would run. ``sys`` is built in, so importing it reads no file.
_BOOTSTRAP = ("import sys; sys.path[:] = sys.argv[3:]; "
              "from regroup.partitioners._worker import run; "
              "run(sys.argv[1], int(sys.argv[2]))")


def call_isolated(target: str, X, kwargs: dict[str, Any], seed: int,
                  time_limit: float | None, who: str,
                  failures: tuple[type[BaseException], ...] | None = None) -> np.ndarray:
    """Call ``target`` (``"regroup.module:function"``) as ``function(X, rng=Generator(seed),
    **kwargs)`` in a subprocess and return the array it returns.

    The child runs with the caller's thread cap (:func:`regroup.executors.thread_limit`).
    Its warnings are re-emitted here. An exception in the child is a
    :class:`PartitionerError` when it is one of ``failures`` (None: any exception, a
    tool whose failures are not typed) or a PartitionerError; any other is a bug in
    regroup and raised as a RuntimeError, as it would be in this process."""
    if not target.startswith("regroup.") or ":" not in target:
        raise ValueError(f"call_isolated runs regroup functions only. Got {target!r} instead.")
    X = sp.csr_matrix(X, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="regroup-part-") as tmp:
        np.savez(os.path.join(tmp, "in.npz"), indptr=X.indptr, indices=X.indices,
                 data=X.data, shape=np.asarray(X.shape))
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump({"target": target, "kwargs": kwargs, "seed": int(seed)}, f)
        cmd = [sys.executable, "-c", _BOOTSTRAP, tmp, str(os.getpid()), *child_sys_path()]
        env = {**os.environ, THREADS_VARIABLE: str(thread_limit())}
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=time_limit, check=False, env=env)
        except subprocess.TimeoutExpired:
            raise PartitionerError(f"{who} exceeded its time limit of {time_limit:g} s") \
                from None
        out = os.path.join(tmp, "out.npy")
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else "no message"
        report = _report(os.path.join(tmp, "report.json"))
        for message in report.get("warnings", []):
            # The same words as in-process, so a layer's recorded warnings do not depend
            # on whether a time limit isolated its partitioner.
            warnings.warn(str(message), RuntimeWarning, stacklevel=3)
        error = report.get("error")
        if error and failures is not None:
            documented = {f"{c.__module__}.{c.__qualname__}" for c in failures}
            documented.add(f"{PartitionerError.__module__}.{PartitionerError.__qualname__}")
            if not documented & set(error.get("types", [])):
                raise RuntimeError(f"{who} raised {error.get('message')} in its subprocess: "
                                   "not a failure its library documents (a bug in regroup)")
        if proc.returncode != 0:
            raise PartitionerError(f"{who} failed in its subprocess (exit code "
                                   f"{proc.returncode}): {last}")
        if not os.path.exists(out):
            raise PartitionerError(f"{who} exited (code 0) without writing a result: {last}")
        return np.load(out)


def _report(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):      # the child died before writing it
        return {}


def run_isolated(name: str, X, size: int, params: dict, seed: int,
                 time_limit: float | None) -> np.ndarray:
    """Run registered partitioner ``name`` on ``X`` in a subprocess; return its ordering."""
    from .registry import get_partitioner

    spec = get_partitioner(name)
    func = spec.func
    target = f"{func.__module__}:{func.__name__}"
    return call_isolated(target, X, {"size": int(size), **params}, seed, time_limit,
                         f"partitioner {name!r}", spec.failures)
