"""Child-process entry point of :func:`regroup.partitioners._isolate.call_isolated`."""
from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
import scipy.sparse as sp


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


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except Exception as exc:  # reported to the parent on stderr, which raises it
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
