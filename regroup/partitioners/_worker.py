"""Child-process entry point of :func:`regroup.partitioners._isolate.call_isolated`.

Started by a bootstrap that sets ``sys.path`` to the parent's before any import (never
the current directory), then :func:`run`."""
from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

import numpy as np
import scipy.sparse as sp

from ..executors import exit_with_parent


def main(folder: str) -> int:
    with open(os.path.join(folder, "job.json")) as f:
        job = json.load(f)
    arrays = np.load(os.path.join(folder, "in.npz"))
    X = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                      shape=tuple(arrays["shape"]))
    module, _, name = job["target"].partition(":")
    if not module.startswith("regroup."):
        raise ValueError(f"refusing to run {job['target']!r}")
    func = getattr(importlib.import_module(module), name)
    out = func(X, rng=np.random.default_rng(job["seed"]), **job["kwargs"])
    tmp = os.path.join(folder, "out.tmp.npy")
    np.save(tmp, np.asarray(out))
    os.replace(tmp, os.path.join(folder, "out.npy"))
    return 0


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def run(folder: str, parent: int) -> None:
    """The child's whole life: do the job in ``folder``, write ``report.json`` and exit;
    the child ends with ``parent``, the process waiting for it."""
    exit_with_parent(parent)
    # What the call warned about, and the exception it raised (with its class hierarchy,
    # so the parent can tell a documented failure from a bug), go back as JSON.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code, error = main(folder), None
        except Exception as exc:
            code = 1
            error = {"types": [_qualname(c) for c in type(exc).__mro__],
                     "message": f"{type(exc).__name__}: {exc}"}
            print(error["message"], file=sys.stderr)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump({"error": error, "warnings": [str(w.message) for w in caught]}, f)
    sys.exit(code)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
