"""Child-process entry point of :func:`regroup.partitioners._isolate.run_isolated`."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import scipy.sparse as sp


def main(folder: str) -> int:
    from . import get_partitioner

    with open(os.path.join(folder, "job.json")) as f:
        job = json.load(f)
    arrays = np.load(os.path.join(folder, "in.npz"))
    X = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                      shape=tuple(arrays["shape"]))
    spec = get_partitioner(job["name"])
    perm = spec.func(X, job["size"], rng=np.random.default_rng(job["seed"]), **job["params"])
    tmp = os.path.join(folder, "perm.tmp.npy")
    np.save(tmp, np.asarray(perm))
    os.replace(tmp, os.path.join(folder, "perm.npy"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except Exception as exc:  # reported to the parent on stderr, which re-raises it
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
