"""N:M sparsity with an input-column permutation: the objective, masks and search.

An N:M weight keeps, in every row, the N largest ``|w|`` of each M consecutive input
columns (2:4 is what sparse tensor cores run). Permuting the input columns first - and
folding the permutation into whatever produces those inputs - keeps more. It is
regroup's problem (group columns so that a structure keeps the most mass) with groups of
M columns instead of panels of b rows.

Conventions (as everywhere in regroup): ``A`` is the nonnegative score matrix (``|w|``,
or a 0/1 pattern for the count objective), rows are output features; ``col_perm`` is an
index array, ``col_perm[j]`` the original column at position ``j``; group ``g`` is
positions ``g*M .. g*M+M-1``. Ties between equal scores are broken by position, so masks
are deterministic.

:func:`nm_search` (regroup's search): a greedy construction that spreads columns whose
large entries share rows across groups, then exact, vectorised local search on three
moves, from one table of replacement gains (the gain of every group when any column takes
the place of any of its members): swaps of two columns, many disjoint ones per round;
cyclic exchanges of three columns among three groups (a move outside ASP's neighbourhood,
which re-splits only two groups at a time); and, on matrices with few groups, exact
re-splits of group pairs (every split of their 2M columns; after the first pass only the
pairs touching a group that changed, as ASP updates its table). Optional seeded kicks
(iterated local search). :func:`asp_search`: the baseline of Pool & Yu, "Channel
Permutations for N:M Sparsity" (NeurIPS'21, NVIDIA apex ASP), re-implemented from the
paper: exhaustive re-partition of stripe pairs (every split of 2M columns into two
groups) applied greedily, then random channel-swap escapes. :func:`nm_optimum`: the exact
optimum of small cases (set partitioning over M-subsets, an integer program).
"""
from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .validation import RegroupError, as_rng, check_int

__all__ = ["check_nm", "nm_problem", "check_nm_mask", "nm_values", "nm_mask", "nm_retained",
           "row_topk_retained", "efficacy", "NMSearch", "nm_search", "asp_search",
           "nm_optimum", "NM_METHODS", "nm_method_problem", "run_nm_method"]

# Wider matrices are searched in consecutive windows of this many columns.
_WINDOW_COLS = 2048
# BLAS threads during nm_search (None: the pool's own size).
_BLAS_THREADS: int | None = 1
# Each chunk of the all-pairs gain tables materialises about this many floats (a few
# such arrays at once at the peak).
_CHUNK_ELEMENTS = 1 << 23


def check_nm(nm: Any, caller: str, name: str = "nm") -> tuple[int, int]:
    """``(N, M)`` from a pair or a string ``"2:4"``: ints with ``1 <= N < M <= 64``."""
    allowed = "N:M with 1 <= N < M <= 64, as '2:4' or (2, 4)"
    if isinstance(nm, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
        if match is None:
            raise ValueError(f"The {name!r} parameter of {caller} must be {allowed}. "
                             f"Got {nm!r} instead.")
        nm = (int(match.group(1)), int(match.group(2)))
    if not (isinstance(nm, (tuple, list)) and len(nm) == 2):
        raise TypeError(f"The {name!r} parameter of {caller} must be {allowed}. "
                        f"Got {nm!r} instead.")
    n = check_int(nm[0], name, caller, low=1, high=63)
    m = check_int(nm[1], name, caller, low=2, high=64)
    if n >= m:
        raise ValueError(f"The {name!r} parameter of {caller} must be {allowed}. "
                         f"Got {n}:{m} instead.")
    return n, m


def nm_problem(rows: int, cols: int, nm: tuple[int, int]) -> str | None:
    """Why a ``rows x cols`` matrix takes no N:M grouping (None when it does): the groups
    of M run along the columns and are never padded, so ``cols`` must be a multiple of M."""
    m = nm[1]
    if cols % m:
        return (f"N:M groups of {m} columns need a column count divisible by {m}; the "
                f"matrix is {rows}x{cols}")
    return None


def check_nm_mask(mask: Any, nm: Any, col_perm: Any) -> None:
    """Raise :class:`RegroupError` unless ``mask`` (2-D, original coordinates) has the N:M
    structure of ``col_perm``: every row keeps at most N of each M-group of permuted
    columns. The check a loaded N:M result must pass (the block formats' is
    :func:`regroup.blocks.check_layout`)."""
    n, m = check_nm(nm, "check_nm_mask")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RegroupError(f"check_nm_mask: expected a 2-D mask, got {mask.ndim}-D")
    rows, cols = mask.shape
    problem = nm_problem(rows, cols, (n, m))
    if problem:
        raise RegroupError(f"check_nm_mask: {problem}")
    perm = _perm(col_perm, cols, "check_nm_mask")
    kept = np.count_nonzero(mask[:, perm].reshape(rows, -1, m), axis=-1)
    if (kept > n).any():
        r, g = np.argwhere(kept > n)[0]
        raise RegroupError(f"the mask is not {n}:{m} after col_perm (row {r} keeps "
                           f"{kept[r, g]} of the {m} columns of group {g})")


def _scores(A: Any, m: int, caller: str) -> np.ndarray:
    """``A`` as a finite, nonnegative float64 matrix whose columns split into M-groups."""
    arr = np.asarray(A)
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise RegroupError(f"{caller}: expected a real 2-D score matrix, got "
                           f"{arr.ndim}-D {arr.dtype}")
    arr = np.abs(arr.astype(np.float64, copy=False))
    if not np.isfinite(arr).all():
        raise RegroupError(f"{caller}: the score matrix holds NaN or infinite values")
    if arr.shape[1] % m or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise RegroupError(f"{caller}: N:M groups of {m} columns need a column count "
                           f"divisible by {m}; the matrix is {arr.shape[0]}x{arr.shape[1]}")
    return arr


def _perm(col_perm: Any, cols: int, caller: str) -> np.ndarray:
    if col_perm is None:
        return np.arange(cols)
    p = np.asarray(col_perm)
    if (p.shape != (cols,) or p.dtype.kind not in "iu"
            or not np.array_equal(np.sort(p), np.arange(cols))):
        raise RegroupError(f"{caller}: col_perm must be a permutation of {cols} columns")
    return p.astype(np.int64)


# Up to this group width the top-N sum runs through a sorting network of elementwise
# max / min (memory-bound, several times faster than np.partition on a short axis).
_NETWORK_MAX = 8


def _topn_sum(X: np.ndarray, n: int) -> np.ndarray:
    """The sum of the ``n`` largest entries along the last axis."""
    m = X.shape[-1]
    if m > _NETWORK_MAX:
        return -np.partition(-X, n - 1, axis=-1)[..., :n].sum(-1)
    return _lanes_topn(list(np.ascontiguousarray(np.moveaxis(X, -1, 0))), n)


def _lanes_topn(lanes: list[np.ndarray], n: int) -> np.ndarray:
    """The elementwise sum of the ``n`` largest of ``lanes`` (equal-shape arrays)."""
    m = len(lanes)
    for r in range(m):                    # odd-even transposition sort, descending
        for i in range(r % 2, m - 1, 2):
            hi = np.maximum(lanes[i], lanes[i + 1])
            lanes[i + 1] = np.minimum(lanes[i], lanes[i + 1])
            lanes[i] = hi
    return sum(lanes[1:n], lanes[0])


def _kept(P: np.ndarray, n: int, m: int) -> np.ndarray:
    """Kept mass per row and group of ``P`` (columns already in group order)."""
    return _topn_sum(P.reshape(P.shape[0], -1, m), n)


def nm_values(A: Any, nm: Any, col_perm: Any = None) -> np.ndarray:
    """Kept ``|A|`` per row and column group (rows x cols/M) under N:M after ``col_perm``."""
    n, m = check_nm(nm, "nm_values")
    A = _scores(A, m, "nm_values")
    return _kept(A[:, _perm(col_perm, A.shape[1], "nm_values")], n, m)


def nm_retained(A: Any, nm: Any, col_perm: Any = None) -> float:
    """Total ``|A|`` that N:M keeps after ``col_perm`` (identity: plain N:M)."""
    return float(nm_values(A, nm, col_perm).sum())


def nm_mask(A: Any, nm: Any, col_perm: Any = None) -> np.ndarray:
    """The N:M mask of ``A``'s columns permuted by ``col_perm``, in ORIGINAL coordinates:
    each row keeps its N largest entries of every M-group of permuted columns (ties to
    the earlier position)."""
    n, m = check_nm(nm, "nm_mask")
    A = _scores(A, m, "nm_mask")
    perm = _perm(col_perm, A.shape[1], "nm_mask")
    rows, cols = A.shape
    G = A[:, perm].reshape(rows, -1, m)
    order = np.argsort(-G, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(G.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    mask = np.empty((rows, cols), dtype=bool)
    mask[:, perm] = keep.reshape(rows, cols)
    return mask


def row_topk_retained(A: Any, nm: Any) -> float:
    """The loose ceiling of the N:M literature: every row keeps its ``cols * N / M``
    largest entries (unstructured at the same density, per row)."""
    n, m = check_nm(nm, "row_topk_retained")
    A = _scores(A, m, "row_topk_retained")
    k = A.shape[1] * n // m
    return float(-np.partition(-A, k - 1, axis=1)[:, :k].sum())


def efficacy(retained: float, plain: float, ceiling: float) -> float:
    """(retained - plain) / (ceiling - plain): the share of the gap to the ceiling closed."""
    return float("nan") if ceiling <= plain else (retained - plain) / (ceiling - plain)


@dataclass
class NMSearch:
    """The outcome of an N:M column search.

    Attributes
    ----------
    col_perm : ndarray of int64
        ``col_perm[j]`` is the original column placed at position ``j``.
    retained, plain : float
        Kept ``|A|`` with ``col_perm`` and with the identity order.
    seconds : float
        Wall time of the search.
    stats : dict
        Search counters (rounds, swaps, kicks, ...), for benchmarks and reports.
    """
    col_perm: np.ndarray
    retained: float
    plain: float
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


class _SwapState:
    """Columns in group order with, per position ``i``, the group's kept sum without it
    (``T``), and per group and row the (N+1)-th largest member (``Ka``) and the gap from
    it to the N-th (``Kw``). Without ``i`` a row's N-th largest is ``K = Ka`` where ``i``
    is kept, ``Ka + Kw`` where it is dropped, so column ``j`` taking ``i``'s place gains
    ``sum_r T[i, r] + max(0, P[r, j] - K)`` minus the group's value: exact for every
    replacement, computed for all pairs at once (``gain_in``, ``replace_gains``)."""

    def __init__(self, A: np.ndarray, perm: np.ndarray, n: int, m: int):
        self.A, self.n, self.m = A, n, m
        self.perm = perm.copy()
        self.P = A[:, self.perm].copy()
        self.rows, self.cols = A.shape
        self.groups = self.cols // m
        self.group = np.arange(self.cols) // m
        self.Pt = np.ascontiguousarray(self.P.T, dtype=np.float32)
        self.value = np.zeros(self.groups)
        self.T = np.zeros(self.cols)
        # per group and row: the (N+1)-th largest of the members (Ka) and how far the
        # N-th lies above it (Kw); per position and row: 1 where the member is dropped
        self.Ka = np.zeros((self.groups, self.rows), dtype=np.float32)
        self.Kw = np.zeros((self.groups, self.rows), dtype=np.float32)
        self.dropped = np.zeros((self.cols, self.rows), dtype=np.float32)
        self.gain_in = np.zeros((self.cols, self.cols), dtype=np.float32)
        self.dirty = np.ones(self.groups, dtype=bool)
        self._update_groups(np.arange(self.groups))
        self._update_gain_rows(np.arange(self.groups))

    def _update_groups(self, groups: np.ndarray) -> None:
        n, m = self.n, self.m
        pos = (groups[:, None] * m + np.arange(m)).ravel()
        G = self.P[:, pos].reshape(self.rows, len(groups), m)
        order = np.argsort(-G, axis=-1, kind="stable")
        S = np.take_along_axis(G, order, axis=-1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(m)[None, None, :], axis=-1)
        top = S[..., :n].sum(-1)                                   # rows x groups
        kept = rank < n
        T = np.where(kept, top[..., None] - G + S[..., n:n + 1], top[..., None])
        self.value[groups] = top.sum(0)
        self.T[pos] = T.sum(0).reshape(-1)
        self.Ka[groups] = S[..., n].T
        self.Kw[groups] = (S[..., n - 1] - S[..., n]).T
        self.dropped[pos] = ~kept.reshape(self.rows, -1).T

    # gain_in[i, j] = sum_r max(0, P[r, j] - K[i, r]), where K[i, r] is Ka[g, r] when i is
    # kept in row r and Ka[g, r] + Kw[g, r] when dropped (g = i's group). So
    #   gain_in[i, j] = sum_r max(0, P[r, j] - Ka) - sum_r dropped[i, r] C[g, j, r],
    # C = clip(P[r, j] - Ka, 0, Kw): a matrix product per group instead of M passes.
    def _gain_block(self, Pt: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """gain_in of ``groups``' positions (groups x M x cols) for columns ``Pt``."""
        C = Pt[None, :, :] - self.Ka[groups][:, None, :]                 # groups x cols x rows
        np.maximum(C, 0, out=C)
        V = C.sum(-1)
        np.minimum(C, self.Kw[groups][:, None, :], out=C)
        dropped = self.dropped.reshape(self.groups, self.m, self.rows)[groups]
        gain = np.matmul(dropped, C.transpose(0, 2, 1))                   # groups x M x cols
        np.subtract(V[:, None, :], gain, out=gain)
        return gain

    def _update_gain_rows(self, groups: np.ndarray) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(1, self.rows * self.cols))
        for s in range(0, len(groups), step):
            g = groups[s:s + step]
            pos = (g[:, None] * self.m + np.arange(self.m)).ravel()
            self.gain_in[pos] = self._gain_block(self.Pt, g).reshape(-1, self.cols)

    def _update_gain_cols(self, pos: np.ndarray) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(1, self.rows * self.groups))
        for s in range(0, len(pos), step):
            p = pos[s:s + step]
            gain = self._gain_block(self.Pt[p], np.arange(self.groups))
            self.gain_in[:, p] = gain.reshape(self.cols, len(p))

    def deltas(self) -> np.ndarray:
        """The gain of every swap of two positions (-inf within a group)."""
        R = self.replace_gains()
        return R + R.T

    def apply(self, swaps: list[tuple[int, int]]) -> None:
        if not swaps:
            return
        a = np.array([s[0] for s in swaps])
        b = np.array([s[1] for s in swaps])
        self.move(np.r_[a, b], np.r_[b, a])

    def move(self, pos: np.ndarray, src: np.ndarray) -> None:
        """Position ``pos[k]`` takes the column at ``src[k]`` (``src`` a reordering of
        ``pos``: swaps, cycles)."""
        self.perm[pos] = self.perm[src]
        self.P[:, pos] = self.P[:, src]
        self.Pt[pos] = self.Pt[src]
        groups = np.unique(self.group[pos])
        self.dirty[groups] = True
        self._update_groups(groups)
        self._update_gain_rows(groups)
        self._update_gain_cols(pos)

    def replace_gains(self) -> np.ndarray:
        """``R[i, j]``: the gain of group(i) when column ``j`` takes position ``i``'s place
        (-inf within a group). A swap gains ``R[i, j] + R[j, i]``; a cycle of positions in
        distinct groups gains the sum of its edges, exactly."""
        base = (self.T - self.value[self.group]).astype(np.float32)
        R = self.gain_in + base[:, None]
        R[self.group[:, None] == self.group[None, :]] = -np.inf
        return R

    def exact_move_gain(self, pos: np.ndarray, src: np.ndarray) -> float:
        """The exact gain of :meth:`move` (float64, from ``A``)."""
        groups = np.unique(self.group[pos])
        before = self.value[groups].sum()
        cols = self.perm.copy()
        cols[pos] = cols[src]
        where = (groups[:, None] * self.m + np.arange(self.m)).ravel()
        return float(_kept(self.A[:, cols[where]], self.n, self.m).sum()) - before

    def total(self) -> float:
        return float(self.value.sum())

    def copy(self) -> _SwapState:
        twin = object.__new__(_SwapState)
        twin.__dict__.update({k: v.copy() if isinstance(v, np.ndarray) and k != "A" else v
                              for k, v in self.__dict__.items()})
        return twin


def _descend(state: _SwapState, eps: float, deadline: float, stats: dict) -> None:
    """Apply improving swaps, many per round (disjoint groups: their gains add exactly),
    until no swap gains more than ``eps``."""
    while time.perf_counter() < deadline:
        D = state.deltas()
        iu = np.triu_indices(state.cols, 1)
        flat = D[iu]
        cand = np.flatnonzero(flat > eps)
        if not len(cand):
            return
        cand = cand[np.argsort(-flat[cand], kind="stable")[:4 * state.groups]]
        used = np.zeros(state.groups, dtype=bool)
        chosen = []
        for c in cand:
            i, j = int(iu[0][c]), int(iu[1][c])
            gi, gj = state.group[i], state.group[j]
            if used[gi] or used[gj]:
                continue
            # float32 gains rank the swaps; each one applied is checked exactly
            if state.exact_move_gain(np.array([i, j]), np.array([j, i])) <= eps:
                continue
            used[gi] = used[gj] = True
            chosen.append((i, j))
        if not chosen:
            return
        state.apply(chosen)
        stats["rounds"] += 1
        stats["swaps"] += len(chosen)


# The pair move re-splits two groups in every way: C(2M, M) / 2 splits (35 for M = 4,
# 6435 for M = 8, too many to score in the search loop).
_PAIR_SPLITS_MAX = 70
# Pair moves run where scoring every group pair costs at most this many element reads per
# pass (few groups): there they find moves the cycles miss; wider matrices rely on cycles.
_ALL_PAIRS_WORK = 1 << 26


def _pair_moves(state: _SwapState, splits: np.ndarray, eps: float,
                dirty: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """One pass of the pair move: the best re-split of group pairs, applied greedily to
    disjoint pairs; scored for every pair touching a ``dirty`` group (changed since the
    last pass, as ASP updates its table), or every pair. Returns the new order and the
    groups it changed, or None when no re-split gains or the matrix has too many groups
    for the pair table."""
    G, m = state.groups, state.m
    if G * (G - 1) // 2 * len(splits) * state.rows * 2 * m > _ALL_PAIRS_WORK:
        return None
    if dirty is not None and dirty.any() and not dirty.all():
        d = np.flatnonzero(dirty)
        a = np.repeat(d, G)
        b = np.tile(np.arange(G), len(d))
        keep = a != b
        pairs = np.unique(np.sort(np.stack([a[keep], b[keep]], 1), axis=1), axis=0)
        g1, g2 = pairs[:, 0], pairs[:, 1]
    else:
        g1, g2 = np.triu_indices(G, 1)
    return _apply_pairs(state, splits, eps, g1, g2)


def _apply_pairs(state: _SwapState, splits: np.ndarray, eps: float, g1: np.ndarray,
                 g2: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The best re-split of each group pair ``(g1[k], g2[k])``, applied greedily to
    disjoint pairs: the new order and the groups changed, or None when none gains."""
    G, m, n = state.groups, state.m, state.n
    gains = np.empty(len(g1))
    orders = np.empty((len(g1), 2 * m), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // (state.rows * len(splits) * 2 * m))
    for s in range(0, len(g1), step):
        gains[s:s + step], orders[s:s + step] = _best_splits(
            state.A, state.perm, state.value, g1[s:s + step], g2[s:s + step], n, splits)
    perm = state.perm.copy()
    used = np.zeros(G, dtype=bool)
    for k in np.argsort(-gains, kind="stable"):
        if gains[k] <= eps:
            break
        a, b = g1[k], g2[k]
        if used[a] or used[b]:
            continue
        used[a] = used[b] = True
        perm[a * m:(a + 1) * m], perm[b * m:(b + 1) * m] = orders[k, :m], orders[k, m:]
    return (perm, used) if used.any() else None


# Each start position's best outgoing replacements searched for 3-cycles (cols x fanout x
# cols per pass): on the benchmark matrices 32 / 64 / 128 / 256 gained 1.042 / 1.055 /
# 1.064 / 1.074x ASP's over plain 2:4.
_CYCLE_FANOUT = 256


def _cycles(state: _SwapState, eps: float, stats: dict) -> bool:
    """Cyclic exchanges of three columns in three groups (i's place takes k's column, k's
    takes j's, j's takes i's): moves that no swap or pair re-split makes, found from the
    replacement gains (each cycle's edge of largest gain among its start's best
    ``_CYCLE_FANOUT``), applied greedily to group-disjoint cycles, each checked exactly.
    True when any was applied."""
    if state.groups < 3:
        return False
    R = state.replace_gains()
    cols = state.cols
    L = min(_CYCLE_FANOUT, cols - 1)
    # a stable sort, not argpartition: which of tied gains enter the fanout must not
    # depend on the CPU's selection kernel (results are the same on every machine)
    top = np.argsort(-R, axis=1, kind="stable")[:, :L]                # cols x L
    first = np.take_along_axis(R, top, axis=1)
    Rt = R.T
    best = np.full(cols, -np.inf, dtype=np.float32)
    arg = np.zeros((cols, 2), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, L * cols))
    for s in range(0, cols, step):
        i = np.arange(s, min(cols, s + step))
        # value of i -> top[i, l] -> j -> i
        V = first[i][:, :, None] + R[top[i]] + Rt[i][:, None, :]       # chunk x L x cols
        flat = V.reshape(len(i), -1).argmax(1)
        best[i] = V.reshape(len(i), -1)[np.arange(len(i)), flat]
        arg[i, 0] = top[i, flat // cols]
        arg[i, 1] = flat % cols
    used = np.zeros(state.groups, dtype=bool)
    pos, src = [], []
    for i in np.argsort(-best, kind="stable"):
        if not best[i] > eps:
            break
        k, j = arg[i]
        g = state.group[[i, k, j]]
        if used[g].any():
            continue
        p, q = np.array([i, k, j]), np.array([k, j, i])
        if state.exact_move_gain(p, q) <= eps:
            continue
        used[g] = True
        pos.append(p)
        src.append(q)
    if not pos:
        return False
    state.move(np.concatenate(pos), np.concatenate(src))
    stats["cycles"] += len(pos)
    return True


def _climb(state: _SwapState, splits: np.ndarray | None, eps: float, deadline: float,
           stats: dict) -> _SwapState:
    """Swap descent, then pair moves, then 3-cycles, until none gains. The pair moves
    score the pairs touching groups changed since the state was last pair-checked
    (``state.dirty``; all groups for a fresh state)."""
    while True:
        _descend(state, eps, deadline, stats)
        if time.perf_counter() >= deadline:
            return state
        moved = None if splits is None else _pair_moves(state, splits, eps, state.dirty)
        if moved is None:
            state.dirty[:] = False
            if _cycles(state, eps, stats):
                continue
            return state
        stats["pair_passes"] += 1
        perm, changed = moved
        state = _SwapState(state.A, perm, state.n, state.m)
        state.dirty[:] = changed


def _greedy_start(A: np.ndarray, n: int, m: int) -> np.ndarray:
    """Columns by decreasing mass, each into the open group where it adds the most kept
    mass: a column's large entries avoid groups whose kept entries already share its rows."""
    rows, cols = A.shape
    groups = cols // m
    members = np.full((groups, m), -1, dtype=np.int64)
    size = np.zeros(groups, dtype=np.int64)
    # K[g, r]: the N-th largest entry of row r among group g's members (0 until N joined)
    K = np.zeros((groups, rows))
    At = A.T
    for c in np.argsort(-A.sum(0), kind="stable"):
        gain = np.maximum(At[c][None, :] - K, 0).sum(1)
        gain[size == m] = -np.inf
        g = int(np.argmax(gain))
        members[g, size[g]] = c
        size[g] += 1
        if size[g] >= n:
            vals = At[members[g, :size[g]]]                       # members x rows
            K[g] = -np.partition(-vals, n - 1, axis=0)[n - 1]
    return members.ravel()


def _search_window(A: np.ndarray, n: int, m: int, rng: np.random.Generator, kicks: int,
                   kick_swaps: int | None, eps: float, deadline: float, stats: dict
                   ) -> np.ndarray:
    """The column order :func:`nm_search` finds for ``A`` (at most ``_WINDOW_COLS`` wide):
    greedy and identity starts climbed, then kicks from the best."""
    cols = A.shape[1]
    groups = cols // m
    ident = np.arange(cols)
    if groups < 2:
        return ident
    splits = _splits(m) if math.comb(2 * m, m) // 2 <= _PAIR_SPLITS_MAX else None
    best_state = None
    for name, start in (("greedy", _greedy_start(A, n, m)), ("identity", ident)):
        if best_state is not None and time.perf_counter() >= deadline:
            break       # out of time: the identity is nm_search's floor anyway
        state = _climb(_SwapState(A, start, n, m), splits, eps, deadline, stats)
        if best_state is None or state.total() > best_state.total() + eps:
            best_state, stats["start"] = state, name
    # Kicks: a few random swaps between distinct groups, applied incrementally to a copy
    # of the best state, then a climb; the best state is kept.
    size = min(groups // 2, kick_swaps if kick_swaps is not None else max(2, groups // 16))
    for _ in range(kicks):
        if time.perf_counter() >= deadline or size < 1:
            break
        stats["kicks"] += 1
        state = best_state.copy()
        g = rng.choice(groups, 2 * size, replace=False) * m + rng.integers(m, size=2 * size)
        state.apply(list(zip(g[:size].tolist(), g[size:].tolist())))
        state = _climb(state, splits, eps, deadline, stats)
        if state.total() > best_state.total() + eps:
            best_state = state
            stats["kicks_kept"] += 1
    return best_state.perm


def nm_search(A: Any, nm: Any = (2, 4), *, seed: Any = 0, kicks: int = 0,
              kick_swaps: int | None = None, time_limit: float | None = None) -> NMSearch:
    """regroup's N:M column permutation: keeps at least plain N:M, deterministic for a
    seed (unless ``time_limit`` cuts it short).

    Parameters
    ----------
    A : array (rows, cols)
        Scores (``|w|``; a 0/1 pattern for the count objective); ``cols % M == 0``.
    nm : (N, M) or "N:M", default 2:4
    seed : int or numpy Generator
        Drives the kicks (the rest of the search is deterministic).
    kicks : int, default 0
        Perturbations of the best order (``kick_swaps`` random swaps, default
        ``max(2, groups // 16)``) each followed by a descent; the best order is kept.
        Off by default: after the cycle exchanges they rarely find more (4 kicks added
        0.003 % of the gain for 5 % more time on the benchmark matrices).
    time_limit : float, optional
        Seconds; the search stops at the first round boundary after it.
    """
    n, m = check_nm(nm, "nm_search")
    A = _scores(A, m, "nm_search")
    kicks = check_int(kicks, "kicks", "nm_search", low=0)
    if kick_swaps is not None:
        kick_swaps = check_int(kick_swaps, "kick_swaps", "nm_search", low=1)
    rng = as_rng(seed)
    t0 = time.perf_counter()
    deadline = math.inf if time_limit is None else t0 + float(time_limit)
    rows, cols = A.shape
    plain = float(_kept(A, n, m).sum())
    eps = 1e-12 * max(1.0, float(A.sum()))
    stats = {"rounds": 0, "swaps": 0, "cycles": 0, "pair_passes": 0, "kicks": 0,
             "kicks_kept": 0,
             "start": "identity", "windows": 1}
    window = max(m, _WINDOW_COLS // m * m)
    # The gain tables' products are many small ones (one per group): a BLAS thread pool
    # only adds overhead there, and spinning threads slow the whole search when the cores
    # are shared (measured: 1.5x the wall time, 2x the CPU time, 2 busy cores).
    with threadpool_limits(limits=_BLAS_THREADS, user_api="blas"):
        if cols <= window:
            best_perm = _search_window(A, n, m, rng, kicks, kick_swaps, eps, deadline, stats)
        else:
            # Wide matrices: consecutive windows searched one after the other (the
            # all-pairs gains cost cols^2 x rows per pass); columns never cross a window.
            edges = list(range(0, cols, window)) + [cols]
            stats["windows"] = len(edges) - 1
            best_perm = np.concatenate([
                lo + _search_window(A[:, lo:hi], n, m, rng, kicks, kick_swaps, eps, deadline,
                                    stats) for lo, hi in zip(edges[:-1], edges[1:])])
            stats["start"] = "windows"
    retained = float(_kept(A[:, best_perm], n, m).sum())
    best_perm, retained = _no_gain_no_move(best_perm, retained, plain, eps)
    return NMSearch(best_perm, retained, plain, time.perf_counter() - t0, stats)


def _no_gain_no_move(perm: np.ndarray, retained: float, plain: float, eps: float
                     ) -> tuple[np.ndarray, float]:
    """The identity order when ``perm`` keeps no more than plain N:M: an order that gains
    nothing is not worth a fold or a gather (an input already N:M, as SR-STE or
    WeightNormSparsifier(zeros_per_block) leave it, keeps its order)."""
    if retained <= plain + eps:
        return np.arange(perm.size), plain
    return perm, retained


def _splits(m: int) -> np.ndarray:
    """Every split of 2M stripe-pair positions into two groups of M (first group holds
    position 0): C(2M, M) / 2 rows of 2M positions, group one then group two."""
    out = []
    for first in itertools.combinations(range(1, 2 * m), m - 1):
        a = (0,) + first
        b = tuple(p for p in range(2 * m) if p not in a)
        out.append(a + b)
    return np.array(out, dtype=np.int64)


def _best_splits(A: np.ndarray, perm: np.ndarray, value: np.ndarray, g1: np.ndarray,
                 g2: np.ndarray, n: int, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the group pairs ``(g1[k], g2[k])``: the gain of the best split of their 2M
    columns into two groups (over ``splits``), and the 2M columns in that order."""
    m = splits.shape[1] // 2
    pos = np.concatenate([g1[:, None] * m + np.arange(m), g2[:, None] * m + np.arange(m)],
                         axis=1)                                       # pairs x 2M
    cols = perm[pos]
    X = A[:, cols]                                                     # rows x pairs x 2M
    if m > _NETWORK_MAX:
        Y = X[:, :, splits].reshape(A.shape[0], len(g1), len(splits), 2, m)
        kept = _topn_sum(Y, n).sum(-1).sum(0)
    else:
        # one contiguous lane per split position: rows x pairs x splits
        kept = sum(_lanes_topn([X[:, :, splits[:, h * m + i]] for i in range(m)], n).sum(0)
                   for h in range(2))
    gain = kept - (value[g1] + value[g2])[:, None]
    k = np.argmax(gain, axis=1)
    idx = np.arange(len(g1))
    return gain[idx, k], cols[idx[:, None], splits[k]]


def asp_search(A: Any, nm: Any = (2, 4), *, seed: Any = 0, escape_attempts: int = 100,
               time_limit: float | None = None) -> NMSearch:
    """The channel-permutation search of NVIDIA ASP (Pool & Yu, NeurIPS'21), from its
    paper: for every pair of stripes (M-column groups), the best of all C(2M, M)/2 ways to
    split their 2M columns into two groups; apply the best improving pair, update the
    pairs it touched, repeat; at a local optimum, escape by swapping two random channels
    of different stripes and descending again (``escape_attempts`` times, keeping the
    best). Any N:M with M <= 4 works here; ASP itself searches 2:4 only."""
    n, m = check_nm(nm, "asp_search")
    A = _scores(A, m, "asp_search")
    escape_attempts = check_int(escape_attempts, "escape_attempts", "asp_search", low=0)
    if math.comb(2 * m, m) // 2 > _PAIR_SPLITS_MAX:
        raise RegroupError(f"asp_search: the stripe-pair search scores all C(2M, M) / 2 "
                           f"splits of two groups, {math.comb(2 * m, m) // 2} for M = {m}; "
                           f"it runs for M <= 4 (ASP itself searches 2:4 only)")
    rng = as_rng(seed)
    t0 = time.perf_counter()
    deadline = math.inf if time_limit is None else t0 + float(time_limit)
    rows, cols = A.shape
    groups = cols // m
    splits = _splits(m)
    stats = {"improvements": 0, "escapes": 0, "escapes_kept": 0}
    plain = float(_kept(A, n, m).sum())
    eps = 1e-12 * max(1.0, float(A.sum()))
    if groups < 2:
        return NMSearch(np.arange(cols), plain, plain, time.perf_counter() - t0, stats)

    # The table of every stripe pair's best split, kept across escapes and updated only
    # for the pairs a change touches, as ASP's search does.
    perm = np.arange(cols)
    value = _kept(A, n, m).sum(0)
    g1, g2 = np.triu_indices(groups, 1)
    gains = np.empty(len(g1))
    orders = np.empty((len(g1), 2 * m), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // (rows * len(splits) * 2 * m))
    for s in range(0, len(g1), step):
        gains[s:s + step], orders[s:s + step] = _best_splits(
            A, perm, value, g1[s:s + step], g2[s:s + step], n, splits)

    def update(a: int, b: int) -> None:
        value[[a, b]] = _kept(A[:, np.r_[perm[a * m:(a + 1) * m], perm[b * m:(b + 1) * m]]],
                              n, m).sum(0)
        touched = np.flatnonzero((g1 == a) | (g2 == a) | (g1 == b) | (g2 == b))
        gains[touched], orders[touched] = _best_splits(A, perm, value, g1[touched],
                                                       g2[touched], n, splits)

    def descend() -> None:
        while time.perf_counter() < deadline:
            k = int(np.argmax(gains))
            if gains[k] <= eps:
                return
            a, b = g1[k], g2[k]
            perm[a * m:(a + 1) * m], perm[b * m:(b + 1) * m] = orders[k, :m], orders[k, m:]
            stats["improvements"] += 1
            update(a, b)

    descend()
    best = (perm.copy(), value.copy(), gains.copy(), orders.copy())
    for _ in range(escape_attempts):
        if time.perf_counter() >= deadline:
            break
        stats["escapes"] += 1
        a, b = rng.choice(groups, 2, replace=False)
        i, j = a * m + rng.integers(m), b * m + rng.integers(m)
        perm[i], perm[j] = perm[j], perm[i]
        update(a, b)
        descend()
        if value.sum() > best[1].sum() + eps:
            best = (perm.copy(), value.copy(), gains.copy(), orders.copy())
            stats["escapes_kept"] += 1
        else:
            perm[:], value[:], gains[:], orders[:] = best
    best_perm, retained = _no_gain_no_move(best[0], float(_kept(A[:, best[0]], n, m).sum()),
                                           plain, eps)
    return NMSearch(best_perm, retained, plain, time.perf_counter() - t0, stats)


def nm_optimum(A: Any, nm: Any = (2, 4), *, max_subsets: int = 200_000,
               time_limit: float = 60.0) -> NMSearch:
    """The best column grouping of a small matrix, exactly: set partitioning over every
    M-subset of columns (value: the subset's kept mass), solved as an integer program
    (scipy's HiGHS). Refused when there are more than ``max_subsets`` subsets."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    import scipy.sparse as sp

    n, m = check_nm(nm, "nm_optimum")
    A = _scores(A, m, "nm_optimum")
    t0 = time.perf_counter()
    rows, cols = A.shape
    count = math.comb(cols, m)
    if count > max_subsets:
        raise RegroupError(f"nm_optimum: {cols} columns give {count} subsets of {m}, more "
                           f"than max_subsets={max_subsets}")
    subsets = np.array(list(itertools.combinations(range(cols), m)), dtype=np.int64)
    values = np.zeros(len(subsets))
    step = max(1, _CHUNK_ELEMENTS // (rows * m))
    for s in range(0, len(subsets), step):
        X = A[:, subsets[s:s + step]]                                  # rows x k x M
        values[s:s + step] = _topn_sum(X, n).sum(0)
    cover = sp.csr_matrix((np.ones(subsets.size), subsets.ravel(),
                           np.arange(0, subsets.size + 1, m)), shape=(len(subsets), cols)).T
    res = milp(-values, constraints=LinearConstraint(cover, 1, 1), integrality=np.ones(len(values)),
               bounds=Bounds(0, 1), options={"time_limit": float(time_limit)})
    if res.x is None or res.status != 0:
        raise RegroupError(f"nm_optimum: the integer program was not solved to optimality "
                           f"({res.message})")
    chosen = subsets[np.flatnonzero(res.x > 0.5)]
    perm = chosen.ravel()
    plain = float(_kept(A, n, m).sum())
    return NMSearch(perm, float(_kept(A[:, perm], n, m).sum()), plain,
                    time.perf_counter() - t0, {"subsets": int(count)})


#: The N:M searches by method name (``RegroupOptions(format="nm", method=...)``): one table
#: for dispatch and validation. ``auto`` is regroup's search; ``asp`` the ASP baseline.
NM_METHODS: dict[str, Any] = {"auto": nm_search, "asp": asp_search}


def nm_method_problem(method: str, nm: tuple[int, int]) -> str | None:
    """Why ``method`` cannot search ``nm`` groupings (None when it can)."""
    if method not in NM_METHODS:
        return f"not an N:M search (those are {', '.join(map(repr, NM_METHODS))})"
    if method == "asp" and math.comb(2 * nm[1], nm[1]) // 2 > _PAIR_SPLITS_MAX:
        return (f"'asp' scores every split of two groups of M columns and runs for "
                f"M <= 4 (ASP itself searches 2:4 only); got {nm[0]}:{nm[1]}")
    return None


def run_nm_method(method: str, A: Any, nm: Any, *, seed: Any = 0,
                  time_limit: float | None = None) -> NMSearch:
    """Run the N:M search ``method`` (a key of :data:`NM_METHODS`) on the scores ``A``;
    the same result for the same seed (unless ``time_limit`` cuts it short)."""
    n, m = check_nm(nm, "run_nm_method")
    problem = nm_method_problem(method, (n, m))
    if problem:
        raise ValueError(f"The 'method' parameter of run_nm_method must be an N:M search "
                         f"valid for {n}:{m}. Got {method!r} instead. ({problem})")
    return NM_METHODS[method](A, (n, m), seed=seed, time_limit=time_limit)
