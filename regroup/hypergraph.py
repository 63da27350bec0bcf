"""The column-net hypergraph model of a sparsity pattern.

Rows are nodes and every non-empty column is a net whose pins are the rows that keep a weight
in that column. ``km1`` (connectivity minus one) and ``cut`` score a row partition the way
hypergraph partitioners do; regroup reports them next to its real objective, retained mass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._atomic import atomic_write
from .pattern import Pattern

__all__ = ["Hypergraph", "column_net", "km1", "cut", "format_hgr", "write_hgr"]


@dataclass(frozen=True, eq=False)
class Hypergraph:
    """A hypergraph in CSR form over nets.

    Attributes
    ----------
    n_nodes : int
    net_ptr : ndarray of intp, shape (n_nets + 1,)
        ``pins[net_ptr[e]:net_ptr[e + 1]]`` are the nodes of net ``e``.
    pins : ndarray of intp
    net_ids : ndarray of intp, shape (n_nets,)
        Original column of each net (empty columns are dropped).
    net_weights : ndarray of int64 or None
    node_weights : ndarray of int64 or None
    """

    n_nodes: int
    net_ptr: np.ndarray
    pins: np.ndarray
    net_ids: np.ndarray
    net_weights: np.ndarray | None = None
    node_weights: np.ndarray | None = None

    @property
    def n_nets(self) -> int:
        return int(self.net_ids.size)

    @property
    def n_pins(self) -> int:
        return int(self.pins.size)


def _from_items(X: sp.spmatrix, net_weights=None, node_weights=None) -> Hypergraph:
    csc = sp.csc_matrix(X)
    csc.sort_indices()
    sizes = np.diff(csc.indptr)
    nonempty = np.flatnonzero(sizes > 0)
    sub = csc[:, nonempty]
    nw = None if net_weights is None else np.asarray(net_weights, np.int64)[nonempty]
    vw = None if node_weights is None else np.asarray(node_weights, np.int64)
    return Hypergraph(n_nodes=X.shape[0], net_ptr=sub.indptr.astype(np.intp),
                      pins=sub.indices.astype(np.intp), net_ids=nonempty.astype(np.intp),
                      net_weights=nw, node_weights=vw)


def column_net(pattern: Pattern | sp.spmatrix, *, net_weights=None,
               node_weights=None) -> Hypergraph:
    """Column-net hypergraph: rows are nodes, non-empty columns are nets.

    Parameters
    ----------
    pattern : Pattern or scipy sparse matrix of shape (n_rows, n_cols)
    net_weights : array-like of int, shape (n_cols,), optional
        Weight per column (entries of empty columns are ignored).
    node_weights : array-like of int, shape (n_rows,), optional
    """
    X = pattern.matrix if isinstance(pattern, Pattern) else pattern
    return _from_items(X, net_weights, node_weights)


def _connectivity(hg: Hypergraph, labels) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.intp)
    if labels.shape != (hg.n_nodes,):
        raise ValueError(f"labels must have shape ({hg.n_nodes},). Got {labels.shape} instead.")
    net_of_pin = np.repeat(np.arange(hg.n_nets), np.diff(hg.net_ptr))
    k = int(labels.max()) + 1 if labels.size else 1
    inc = sp.csr_matrix((np.ones(hg.n_pins), (net_of_pin, labels[hg.pins])),
                        shape=(hg.n_nets, k))
    inc.sum_duplicates()
    return np.diff(inc.indptr)  # number of distinct parts per net


def km1(hg: Hypergraph, labels) -> int:
    """Connectivity-minus-one objective: sum over nets of ``w_e * (lambda_e - 1)``."""
    lam = _connectivity(hg, labels)
    w = np.ones(hg.n_nets, np.int64) if hg.net_weights is None else hg.net_weights
    return int(np.sum(w * (lam - 1)))


def cut(hg: Hypergraph, labels) -> int:
    """Cut-net objective: total weight of nets spanning more than one part."""
    lam = _connectivity(hg, labels)
    w = np.ones(hg.n_nets, np.int64) if hg.net_weights is None else hg.net_weights
    return int(np.sum(w[lam > 1]))


def format_hgr(hg: Hypergraph):
    """Yield the lines of the hMETIS ``.hgr`` text format (1-based pins).

    The header's format code is 1 with net weights, 10 with node weights, 11 with both.
    """
    fmt = (1 if hg.net_weights is not None else 0) + (10 if hg.node_weights is not None else 0)
    yield f"{hg.n_nets} {hg.n_nodes}" + (f" {fmt}" if fmt else "")
    for e in range(hg.n_nets):
        pins = hg.pins[hg.net_ptr[e]:hg.net_ptr[e + 1]] + 1
        head = f"{hg.net_weights[e]} " if hg.net_weights is not None else ""
        yield head + " ".join(map(str, pins.tolist()))
    if hg.node_weights is not None:
        for w in hg.node_weights.tolist():
            yield str(w)


def write_hgr(hg: Hypergraph, path: str | os.PathLike) -> None:
    """Write ``hg`` as an hMETIS ``.hgr`` file (atomically: temporary file, then rename)."""
    with atomic_write(path) as f:
        for line in format_hgr(hg):
            f.write(line + "\n")
