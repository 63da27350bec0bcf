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
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._validation import PartitionerError

__all__ = ["run_isolated", "call_isolated"]


def call_isolated(target: str, X, kwargs: dict[str, Any], seed: int,
                  time_limit: float | None, who: str) -> np.ndarray:
    """Call ``target`` (``"regroup.module:function"``) as ``function(X, rng=Generator(seed),
    **kwargs)`` in a subprocess and return the array it returns."""
    if not target.startswith("regroup.") or ":" not in target:
        raise ValueError(f"call_isolated runs regroup functions only. Got {target!r} instead.")
    X = sp.csr_matrix(X, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="regroup-part-") as tmp:
        np.savez(os.path.join(tmp, "in.npz"), indptr=X.indptr, indices=X.indices,
                 data=X.data, shape=np.asarray(X.shape))
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump({"target": target, "kwargs": kwargs, "seed": int(seed)}, f)
        cmd = [sys.executable, "-m", "regroup.partitioners._worker", tmp]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=time_limit, check=False)
        except subprocess.TimeoutExpired:
            raise PartitionerError(f"{who} exceeded its time limit of {time_limit:g} s") \
                from None
        out = os.path.join(tmp, "out.npy")
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else "no message"
        if proc.returncode != 0:
            raise PartitionerError(f"{who} failed in its subprocess (exit code "
                                   f"{proc.returncode}): {last}")
        if not os.path.exists(out):
            raise PartitionerError(f"{who} exited (code 0) without writing a result: {last}")
        return np.load(out)


def run_isolated(name: str, X, size: int, params: dict, seed: int,
                 time_limit: float | None) -> np.ndarray:
    """Run registered partitioner ``name`` on ``X`` in a subprocess; return its ordering."""
    from .registry import get_partitioner

    func = get_partitioner(name).func
    target = f"{func.__module__}:{func.__name__}"
    return call_isolated(target, X, {"size": int(size), **params}, seed, time_limit,
                         f"partitioner {name!r}")
