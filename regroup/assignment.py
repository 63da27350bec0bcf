"""Assigning items to groups of fixed sizes so that the sum of their values is largest.

Refinement's sub-steps (rows to row panels, columns to column groups) are this problem:
``n`` items, ``k`` groups of ``size`` consecutive slots (the last one may be short), and a
value ``values[i, g]`` for item ``i`` in group ``g``. It is a transportation problem with
only ``k`` sinks, far fewer than the ``n`` items, and this module solves it that way:

- :func:`assign` (exact) starts from a feasible assignment (the caller's current order,
  or the greedy one) and cancels improving cycles. Moving one item
  from group ``p`` to ``q`` along every edge of a cycle ``p -> q -> ... -> p`` keeps every
  group's size; the best item for the edge ``p -> q`` is the one in ``p`` that gains most
  by moving to ``q``. The assignment is optimal exactly when this k-node graph holds no
  cycle of positive total gain (the transportation problem's optimality condition), so
  the search ends at the optimum. Improving swaps (2-cycles, half of all improving
  cycles on DLMC's steps) are taken many at once, disjoint; longer cycles are found by
  Bellman-Ford on the k x k gains; only the groups that changed are re-scanned. On
  DLMC's refinement steps (b=32, up to 1000 items) it matches scipy's
  ``linear_sum_assignment`` on the items x slots matrix to the last bit of the
  objective, about 10x faster.
- :func:`assign_greedy`: pairs by decreasing value, each taken while the item is free and
  the group has room. Not optimal; :func:`assign` starts from it when given no start.
- :func:`assign_within`: :func:`assign` with a bound on its work (cells of the value and
  gain tables visited, counted, so the bound is deterministic): it stops between two
  improving steps once the bound is spent, and says so. Many groups (a tall matrix in
  small blocks) can otherwise take thousands of cycles of ``O(k^2)`` each.

Both return ``perm`` with ``perm[slot] = item`` (items of group 0 first, each group's
items in increasing index order), as the orders elsewhere in regroup.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["assign", "assign_within", "Assigned", "assign_greedy", "group_sizes"]


def group_sizes(n: int, size: int) -> np.ndarray:
    """Sizes of the ``ceil(n / size)`` groups of ``size`` slots (the last may be short)."""
    k = -(-n // size)
    caps = np.full(k, size, np.intp)
    if k:
        caps[-1] = n - size * (k - 1)
    return caps


def _order(group_of: np.ndarray) -> np.ndarray:
    return np.argsort(group_of, kind="stable").astype(np.intp)


def _groups(perm: np.ndarray, size: int) -> np.ndarray:
    group_of = np.empty(perm.size, np.intp)
    group_of[perm] = np.arange(perm.size) // size
    return group_of


def assign_greedy(values: np.ndarray, size: int) -> np.ndarray:
    """Greedy assignment: (item, group) pairs by decreasing value, each taken while the
    item is free and the group has room.

    The pairs are scanned in chunks: numpy drops those whose item is placed or whose group
    is full at the chunk's start, and only the rest are checked one by one (the scan is
    then the same as the plain sequential one, at a fraction of the Python steps)."""
    n, k = values.shape
    room = group_sizes(n, size)
    neg = -values.ravel()
    group_of = np.full(n, -1, np.intp)
    left = n
    chunk = max(4 * n, 4096)
    # The stable order of all pairs, head first: pairs strictly above the chunk-th value
    # usually place every item, and sorting only them is much cheaper.
    parts = [np.arange(neg.size)]
    if neg.size > chunk:
        threshold = np.partition(neg, chunk)[chunk]
        parts = [np.flatnonzero(neg < threshold), np.flatnonzero(neg >= threshold)]
    for part in parts:
        flat = part[np.argsort(neg[part], kind="stable")]
        for start in range(0, flat.size, chunk):
            items, groups = np.divmod(flat[start:start + chunk], k)
            live = (group_of[items] < 0) & (room[groups] > 0)
            for i, g in zip(items[live].tolist(), groups[live].tolist()):
                if group_of[i] < 0 and room[g] > 0:
                    group_of[i] = g
                    room[g] -= 1
                    left -= 1
            if not left:
                break
        if not left:
            break
    return _order(group_of)


def _best_moves(values: np.ndarray, perm: np.ndarray, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(k, k) best gain of moving one item of group p to group q, and that item (the
    first in slot order among ties); -inf on the diagonal. Group p holds the items in
    slots ``p * size`` to ``(p + 1) * size`` of ``perm``."""
    n, k = values.shape
    starts = np.arange(k) * size
    own = np.repeat(np.arange(k), group_sizes(n, size))
    gain = values[perm] - values[perm, own][:, None]
    best = np.maximum.reduceat(gain, starts, axis=0)
    hit = gain == best[own]
    first = np.minimum.reduceat(np.where(hit, np.arange(n)[:, None], n), starts, axis=0)
    np.fill_diagonal(best, -np.inf)
    return best, perm[first]


def _update_moves(values: np.ndarray, perm: np.ndarray, size: int, groups: list[int],
                  best: np.ndarray, item: np.ndarray) -> None:
    """Recompute rows ``groups`` of :func:`_best_moves` in place, in one vectorised pass
    over the full groups (the short last group apart)."""
    n, k = values.shape
    groups = np.asarray(groups, np.intp)
    last = k - 1 if n % size else -1
    for part in (groups[groups != last], groups[groups == last]):
        if not part.size:
            continue
        width = size if part[0] != last else n - size * (k - 1)
        members = perm[part[:, None] * size + np.arange(width)]          # (g, width)
        gain = values[members] - values[members, part[:, None]][..., None]   # (g, w, k)
        arg = gain.argmax(axis=1)                                         # (g, k)
        rows = np.take_along_axis(gain, arg[:, None, :], axis=1)[:, 0, :]
        rows[np.arange(part.size), part] = -np.inf
        best[part] = rows
        item[part] = np.take_along_axis(members, arg, axis=1)


def _positive_swaps(gain: np.ndarray, eps: float) -> list[tuple[int, int]]:
    """Disjoint pairs of groups (p, q) whose swap of their best items gains, best first
    (greedy): the 2-cycles, half of all the improving cycles on DLMC's steps, found for
    all groups at once."""
    both = gain + gain.T
    p, q = np.nonzero(np.triu(both > eps, 1))
    if not p.size:
        return []
    order = np.argsort(-both[p, q], kind="stable")
    used: set[int] = set()
    pairs = []
    for a, b in zip(p[order].tolist(), q[order].tolist()):
        if a not in used and b not in used:
            used.update((a, b))
            pairs.append((a, b))
    return pairs


def _predecessor_cycle(pred: np.ndarray, node: int) -> list[int] | None:
    """The cycle reached by following ``pred`` from ``node`` (in edge order), or None
    when the walk ends (-1) first."""
    seen: dict[int, int] = {}
    walk: list[int] = []
    while node >= 0 and node not in seen:
        seen[node] = len(walk)
        walk.append(node)
        node = int(pred[node])
    if node < 0:
        return None
    return walk[seen[node]:][::-1]


def _positive_cycle(gain: np.ndarray, eps: float) -> tuple[list[int] | None, int]:
    """A cycle of total gain > 0 in the complete digraph with edge gains ``gain`` (as
    node list, edges node[j] -> node[j + 1] and back to node[0]), or None; and the
    number of Bellman-Ford rounds it took (each visits the k x k gains).

    Bellman-Ford for the longest paths from a virtual source joined to every node. A
    cycle in the predecessor graph has positive gain, so each round checks for one
    through a node it raised (most improving cycles show within a few rounds); if
    distances still rise after k rounds, there is one."""
    k = len(gain)
    dist = np.zeros(k)
    pred = np.full(k, -1, np.intp)
    cols = np.arange(k)
    for rounds in range(1, k + 2):
        through = dist[:, None] + gain
        arg = through.argmax(axis=0)
        reach = through[arg, cols]
        up = reach > dist + eps
        if not up.any():
            return None, rounds
        dist = np.where(up, reach, dist)
        pred = np.where(up, arg, pred)
        cycle = _predecessor_cycle(pred, int(np.flatnonzero(up)[0]))
        if cycle is not None:
            return cycle, rounds
    raise AssertionError("Bellman-Ford: distances rose for k + 1 rounds without a cycle")


class Assigned(NamedTuple):
    """What :func:`assign_within` returns."""

    perm: np.ndarray    # perm[slot] = item
    work: int           # cells of the value and gain tables visited
    optimal: bool       # False: stopped when the work bound was spent


def assign(values: np.ndarray, size: int, start: np.ndarray | None = None) -> np.ndarray:
    """Order of items maximising ``sum values[i, group(i)]``, groups of ``size``
    consecutive slots (the last may be short); exact. Returns ``perm[slot] = item``.

    ``start`` (an order in the same form, e.g. the current one) is where the search
    begins (default: the greedy order); the result is never worse than it."""
    return assign_within(values, size, start).perm


def assign_within(values: np.ndarray, size: int, start: np.ndarray | None = None, *,
                  work_limit: int | None = None) -> Assigned:
    """:func:`assign`, stopping between two improving steps once ``work_limit`` cells of
    the value and gain tables have been visited (None: no bound, always optimal). The
    work is counted, not timed, so where it stops does not depend on the machine. The
    order returned is never worse than ``start``."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError("The 'values' parameter of assign must be a 2-D array of finite "
                         f"numbers. Got shape {values.shape} with non-finite entries instead."
                         if values.ndim == 2 else "The 'values' parameter of assign must be "
                         f"a 2-D array of finite numbers. Got {values.ndim} dimensions instead.")
    n, k = values.shape
    # Any feasible start reaches the optimum; a good one (the caller's current order in
    # refinement) needs fewer cycles. Starting from the better of it and the greedy order
    # was measured no faster on DLMC's refinement steps.
    perm = (assign_greedy(values, size) if start is None
            else np.array(start, dtype=np.intp, copy=True))
    work = n * k
    if k < 2:
        return Assigned(_order(_groups(perm, size)), work, True)
    slot_of = np.empty(n, np.intp)
    slot_of[perm] = np.arange(n)
    # Gains below this are rounding noise, not improvements; it also bounds the number of
    # cycles, as each one raises the total by more than it.
    eps = 8 * np.finfo(float).eps * max(float(np.abs(values).max()), 1.0)
    best, item = _best_moves(values, perm, size)
    work += n * k
    optimal = True
    while True:
        if work_limit is not None and work >= work_limit:
            optimal = False
            break
        # Swaps first (many at once, disjoint), then one longer cycle at a time.
        pairs = _positive_swaps(best, eps)
        work += k * k
        if pairs:
            touched = [g for pair in pairs for g in pair]
            ps, qs = np.array(pairs).T
            a, b = item[ps, qs], item[qs, ps]
            slot_a, slot_b = slot_of[a], slot_of[b]
            perm[slot_a], perm[slot_b] = b, a
            slot_of[a], slot_of[b] = slot_b, slot_a
        else:
            cycle, rounds = _positive_cycle(best, eps)
            work += rounds * k * k
            if cycle is None:
                break
            heads = cycle[1:] + cycle[:1]
            if best[cycle, heads].sum() <= eps:
                break       # no gain above rounding left to take
            # Item j leaves cycle[j] for heads[j], into the slot of the item leaving
            # heads[j].
            moved = item[cycle, heads]
            slots = slot_of[np.roll(moved, -1)]
            perm[slots] = moved
            slot_of[moved] = slots
            touched = cycle
        _update_moves(values, perm, size, touched, best, item)
        work += len(touched) * size * k
    return Assigned(_order(_groups(perm, size)), work, optimal)
