"""Run a partitioner in a child process, with a time limit.

Native partitioners can hang, crash, or (the kahypar wheel) call ``exit()`` inside the host
process. The child reads the matrix and options from a temporary folder and writes the
ordering back; the parent turns every failure into a :class:`PartitionerError` that names
the partitioner and the cause.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import scipy.sparse as sp

from .._validation import PartitionerError

__all__ = ["run_isolated"]


def run_isolated(name: str, X, size: int, params: dict, seed: int,
                 time_limit: float | None) -> np.ndarray:
    """Run partitioner ``name`` on ``X`` in a subprocess and return its ordering."""
    X = sp.csr_matrix(X, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="regroup-part-") as tmp:
        np.savez(os.path.join(tmp, "in.npz"), indptr=X.indptr, indices=X.indices,
                 data=X.data, shape=np.asarray(X.shape))
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump({"name": name, "size": int(size), "params": params, "seed": int(seed)}, f)
        cmd = [sys.executable, "-m", "regroup.partitioners._worker", tmp]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=time_limit, check=False)
        except subprocess.TimeoutExpired:
            raise PartitionerError(f"partitioner {name!r} exceeded its time limit of "
                                   f"{time_limit:g} s") from None
        out = os.path.join(tmp, "perm.npy")
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else "no message"
        if proc.returncode != 0:
            raise PartitionerError(f"partitioner {name!r} failed in its subprocess (exit code "
                                   f"{proc.returncode}): {last}")
        if not os.path.exists(out):
            raise PartitionerError(f"partitioner {name!r} exited (code 0) without writing an "
                                   f"ordering: {last}")
        return np.load(out)
