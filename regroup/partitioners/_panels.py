"""Turning part labels into panel permutations with exact panel sizes."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from ..validation import PartitionerError

__all__ = ["n_panels", "panel_sizes", "labels_to_perm", "check_perm", "AFFINITY_CELLS"]

# labels_to_perm places over-full parts' items by affinity up to this many (item x part)
# affinities (128 MiB); above, in index order (with a RuntimeWarning).
AFFINITY_CELLS = 1 << 24


def n_panels(n: int, size: int) -> int:
    return -(-n // size)


def panel_sizes(n: int, size: int) -> np.ndarray:
    """Sizes of consecutive panels: all ``size`` except a possibly short last one."""
    k = n_panels(n, size)
    sizes = np.full(k, size, dtype=np.intp)
    if k:
        sizes[-1] = n - size * (k - 1)
    return sizes


def check_perm(perm, n: int, who: str) -> np.ndarray:
    """Return ``perm`` as an intp array after checking it is a bijection of ``range(n)``."""
    perm = np.asarray(perm)
    if perm.shape != (n,) or not np.issubdtype(perm.dtype, np.integer):
        raise PartitionerError(f"{who} returned an ordering of shape {perm.shape} and dtype "
                               f"{perm.dtype}; expected {n} integer indices")
    perm = perm.astype(np.intp, copy=False)
    seen = np.zeros(n, dtype=bool)
    if n:
        if perm.min() < 0 or perm.max() >= n:
            raise PartitionerError(f"{who} returned indices outside [0, {n})")
        seen[perm] = True
    if not seen.all():
        raise PartitionerError(f"{who} returned an ordering that is not a permutation "
                               f"({int((~seen).sum())} items missing)")
    return perm


def labels_to_perm(labels, size: int, X: sp.spmatrix | None = None, *,
                   who: str = "partitioner") -> np.ndarray:
    """Order items so that parts become consecutive panels of exactly ``size`` items.

    Tools rarely hit exact sizes. Over-full parts give up the items least attached to them
    (affinity = shared mass ``X_i . sum_{j in part} X_j``) and those go, most attached first,
    to the parts with room; the smallest part becomes the short last panel.

    Parameters
    ----------
    labels : array-like of int, shape (n,)
    size : int
    X : sparse matrix of shape (n, f), optional
        Item features used for the affinity; without it overflow moves in index order.

    Returns
    -------
    perm : ndarray of intp, shape (n,)
        ``perm[i]`` is the item at position ``i``; panel ``p`` is ``perm[p*size:(p+1)*size]``.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if labels.ndim != 1 or (n and (labels.min() < 0)):
        raise PartitionerError(f"{who} returned invalid part labels (shape {labels.shape})")
    labels = labels.astype(np.intp)
    k_target = n_panels(n, size)
    # Compact labels, keep first-appearance order stable by label value.
    uniq, labels = np.unique(labels, return_inverse=True)
    k = max(len(uniq), k_target)
    counts = np.bincount(labels, minlength=k)
    # Capacities: the smallest part (ties: highest label) takes the short panel.
    caps = np.full(k, size, dtype=np.intp)
    if k > k_target:
        # More parts than panels: the smallest parts are emptied into the others.
        order = np.lexsort((-np.arange(k), counts))
        caps[order[: k - k_target]] = 0
        live = np.sort(order[k - k_target:])
    else:
        live = np.arange(k)
    short = n - size * (k_target - 1)
    if k_target and short != size:
        smallest = live[np.lexsort((-live, counts[live]))[0]]
        caps[smallest] = short
    over = np.flatnonzero(counts > caps)
    if X is not None and over.size:
        X = sp.csr_matrix(X, dtype=np.float64)
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
        profile = (onehot.T @ X).tocsr()
        self_aff = np.asarray(X.multiply(X).sum(axis=1)).ravel()

        def own_affinity(members: np.ndarray, p: int) -> np.ndarray:
            # Only the over-full parts' members need it: a full items x parts product
            # costs seconds on a 4096 x 11008 half-dense matrix.
            return (X[members] @ profile[p].T).toarray().ravel() - self_aff[members]

        def affinity(items: np.ndarray) -> np.ndarray:
            aff = (X[items] @ profile.T).toarray()
            aff[np.arange(len(items)), labels[items]] -= self_aff[items]
            return aff
    else:
        def own_affinity(members: np.ndarray, p: int) -> np.ndarray:
            return np.zeros(len(members))

        def affinity(items: np.ndarray) -> np.ndarray:
            return np.zeros((len(items), k))
    assign = labels.copy()
    overflow = []
    by_label = np.argsort(labels, kind="stable")           # each part's items, in index order
    first = np.concatenate([[0], np.cumsum(counts)])
    for p in over:
        members = by_label[first[p]:first[p + 1]]
        # Least attached first; stable on index for ties.
        order = np.lexsort((members, own_affinity(members, p)))
        overflow.append(members[order[: counts[p] - caps[p]]])
    room = caps - np.minimum(counts, caps)
    if overflow:
        items = np.concatenate(overflow)
        if items.size * k <= AFFINITY_CELLS:
            aff = affinity(items)
            best = aff[:, room > 0].max(axis=1) if (room > 0).any() else np.zeros(len(items))
            for j in np.lexsort((items, -best)):
                cand = np.flatnonzero(room > 0)
                p = cand[np.argmax(aff[j, cand])]
                assign[items[j]] = p
                room[p] -= 1
        else:
            # Too many (item x part) affinities to hold (a tool that ignored the balance,
            # or tiny parts): items go, in index order, to the parts with room in label
            # order - what the loop above does with no affinities.
            warnings.warn(f"{who}: {items.size} rows overflow their parts; {items.size} x "
                          f"{k} affinities are more than {AFFINITY_CELLS} (regroup."
                          "partitioners._panels.AFFINITY_CELLS), so they fill the parts "
                          "with room in index order", RuntimeWarning, stacklevel=2)
            open_parts = np.flatnonzero(room > 0)
            assign[np.sort(items)] = np.repeat(open_parts, room[open_parts])[:items.size]
    # Slot order: full panels by label, the short one last.
    final_counts = np.bincount(assign, minlength=k)
    full = final_counts == size
    slots = np.concatenate([np.flatnonzero(full), np.flatnonzero(~full & (final_counts > 0))])
    slot_of = np.empty(k, np.intp)
    slot_of[slots] = np.arange(slots.size)
    # Items by slot, each part's in increasing index (a stable sort).
    perm = np.argsort(slot_of[assign], kind="stable").astype(np.intp)
    return check_perm(perm, n, who)
