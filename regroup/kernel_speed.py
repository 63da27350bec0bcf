"""CPU speed of a block-sparse layer against its dense layer (torch, imported lazily).

:func:`time_layer` times, for one weight shape, dense ``torch.nn.functional.linear`` and
torch's BSR product (``torch.sparse_bsr_tensor`` + ``torch.mm``) for any number of kept
block counts, in fp32 on the CPU at a fixed batch. The BSR product is the one
:class:`regroup.adapters.torch.BlockSparseLinear` runs on its ``bsr`` path: the input
transposed to a contiguous ``(cols, batch)`` copy, ``torch.mm``, the output transposed
back (a view). Grid: blocks on the ``P x Q`` grid of the padded shape, no permutation
(the layout is folded into the neighbouring layers; a runtime permutation adds a gather
and a scatter, about 1 % at 4096^2). Shuffled: one block column per kept tile and the
gather of every tile's input columns, as the adapter does.

Which blocks are kept matters little to the time; their number does. Kept blocks are
drawn at random (rows of the grid may hold different counts), deterministically for a
seed, shape, block and count. Weights and inputs are random normal values.

Timing: one warm-up call per path, then rounds that run every path once in turn (so
load on the machine hits every path alike) until ``max_seconds`` have passed after at
least ``min_reps`` rounds, or ``max_reps`` rounds; each path's best round counts.
Times depend on the machine, its load and torch's thread count (recorded).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .validation import check_block, check_choice, check_int, missing_dependency
from .blocks import FORMATS

__all__ = ["BATCH", "KernelTimes", "speed_problem", "time_layer", "torch_versions"]

# Rows of the input (tokens or samples) per timed product: a serving batch on CPU, and
# the batch of the measurements in FIELD_NOTES and benchmarks/kernel_bench.py.
BATCH = 256


@dataclass(frozen=True)
class KernelTimes:
    """Best-of-rounds seconds of one layer shape's products.

    Attributes
    ----------
    dense : float
        ``F.linear(x, W)`` with the dense ``(rows, cols)`` weight.
    bsr : dict of int -> float
        Per kept block count, the BSR product (0.0 for no kept block: nothing to run).
    rounds : int
        Timed rounds (each path ran once per round).
    """

    dense: float
    bsr: dict[int, float]
    rounds: int

    def speedup(self, kept_blocks: int) -> float | None:
        """Dense time over BSR time at ``kept_blocks`` (None with no kept block)."""
        t = self.bsr[kept_blocks]
        return self.dense / t if t > 0 else None


def speed_problem(block: Any) -> str | None:
    """Why CPU block-sparse speed cannot be measured here (None: it can): torch is not
    importable, or the block is not square (MKL's CPU BSR product refuses it)."""
    br, bc = check_block(block, "speed_problem")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return (f"torch is not importable ({type(exc).__name__}: {exc}); install it "
                "(`pip install torch`) to measure the CPU block-sparse speed-up")
    if br != bc:
        return (f"CPU BSR products need square blocks (MKL); block {br}x{bc} has none "
                "(the CUDA and Triton paths are not measured here)")
    return None


def torch_versions(threads: int | None = None) -> dict[str, Any]:
    """``{"torch": version, "threads": count}`` of the timing backend: ``threads``, or
    torch's current thread count when None (both None when torch is absent)."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "threads": None}
    return {"torch": torch.__version__,
            "threads": threads if threads is not None else torch.get_num_threads()}


def _kept_grid(rng: np.random.Generator, P: int, Q: int, kept: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``kept`` distinct random cells of the ``P x Q`` grid, row-major: (rows, cols)."""
    cells = np.sort(rng.choice(P * Q, size=kept, replace=False))
    return cells // Q, cells % Q


def _bsr_product(torch, shape: tuple[int, int], block: tuple[int, int], kept: int,
                 fmt: str, seed: int) -> tuple[Callable[[Any], Any], Any, Any]:
    """``(run, W, gather)``: ``run(x)`` is ``x @ W.T`` through the BSR ``W`` with ``kept``
    random blocks, as the adapter computes it; ``W`` is padded to whole blocks (grid) or
    has one block column per tile (shuffled, whose input columns ``gather`` picks from
    ``x`` with a zero column appended; None for grid)."""
    n, m = shape
    br, bc = block
    P, Q = -(-n // br), -(-m // bc)
    rng = np.random.default_rng([seed, n, m, br, bc, kept, FORMATS.index(fmt)])
    rows, cols = _kept_grid(rng, P, Q, kept)
    gather = None
    if fmt == "shuffled":
        # Tile t is block column t of its panel's block row; its bc input columns are
        # gathered (index m is the appended zero column that pads short tiles).
        cols = np.arange(kept)
        gather = torch.from_numpy(rng.integers(0, m + 1, size=kept * bc).astype(np.int64))
        Q = kept
    crow = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=P))])
                            .astype(np.int64))
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
    values = torch.randn((kept, br, bc), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        W = torch.sparse_bsr_tensor(crow, torch.from_numpy(cols.astype(np.int64)), values,
                                    size=(P * br, Q * bc), check_invariants=False)
    pad_cols = Q * bc - m

    def run(x):
        xt = x.t().contiguous()
        if gather is not None:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, 1)).index_select(0, gather)
        elif pad_cols:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad_cols))
        return torch.mm(W, xt)[:n].t()
    return run, W, gather


def time_layer(shape: tuple[int, int], block: Any, kept_blocks: Sequence[int], *,
               format: str = "grid", batch: int = BATCH, seed: int = 0, min_reps: int = 3,
               max_reps: int = 20, max_seconds: float = 1.0,
               threads: int | None = None) -> KernelTimes:
    """Time the dense product of a ``shape`` weight and its BSR products.

    Parameters
    ----------
    shape : (int, int)
        The weight matrix ``(rows, cols)``: rows are output features.
    block : int, (int, int) or str
        Square block (CPU BSR products need one; see :func:`speed_problem`).
    kept_blocks : sequence of int
        Kept block (tile) counts to time, each in ``[0, P*Q]`` for the ``P x Q`` block
        grid of the shape padded to whole blocks.
    format : {"grid", "shuffled"}, default="grid"
    batch : int, default=BATCH
        Rows of the fp32 input ``x`` of shape ``(batch, cols)``.
    seed : int, default=0
        Seed of the kept-block positions and the random values.
    min_reps, max_reps, max_seconds
        Rounds: at least ``min_reps``, then until ``max_seconds`` of timing have passed
        or ``max_reps`` rounds (the timing budget of one call is about
        ``max(max_seconds, min_reps x one round)`` plus the warm-up round).
    threads : int, optional
        torch's intra-op thread count while timing (restored after); None: torch's
        current setting. On a machine shared with other work, fewer threads than cores
        avoid descheduled threads, which make small products look milliseconds long.

    Returns
    -------
    KernelTimes

    Raises
    ------
    ImportError
        torch is not importable.
    ValueError, TypeError
        Invalid parameters, or a non-square block.
    """
    caller = "time_layer"
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch", caller) from None
    br, bc = check_block(block, caller)
    if br != bc:
        raise ValueError(f"The 'block' parameter of {caller} must be square (CPU BSR "
                         f"products need square blocks). Got {br}x{bc} instead.")
    check_choice(format, "format", caller, set(FORMATS))
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise TypeError(f"The 'shape' parameter of {caller} must be a pair (rows, cols). "
                        f"Got {shape!r} instead.")
    n = check_int(shape[0], "shape", caller, low=1)
    m = check_int(shape[1], "shape", caller, low=1)
    batch = check_int(batch, "batch", caller, low=1, high=1 << 20)
    seed = check_int(seed, "seed", caller, low=0, high=2**63 - 1)
    min_reps = check_int(min_reps, "min_reps", caller, low=1, high=1000)
    max_reps = check_int(max_reps, "max_reps", caller, low=min_reps, high=1000)
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or \
            not 0 <= max_seconds <= 3600:
        raise ValueError(f"The 'max_seconds' parameter of {caller} must be a number of "
                         f"seconds in [0, 3600]. Got {max_seconds!r} instead.")
    grid = (-(-n // br)) * (-(-m // bc))
    counts = [check_int(k, "kept_blocks", caller, low=0, high=grid) for k in kept_blocks]
    counts = list(dict.fromkeys(counts))
    if threads is not None:
        threads = check_int(threads, "threads", caller, low=1, high=4096)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _time(torch, (n, m), (br, bc), counts, format, batch, seed, min_reps,
                     max_reps, max_seconds)
    finally:
        torch.set_num_threads(before)


def _time(torch, shape: tuple[int, int], block: tuple[int, int], counts: list[int],
          fmt: str, batch: int, seed: int, min_reps: int, max_reps: int,
          max_seconds: float) -> KernelTimes:
    n, m = shape
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((n, m), generator=g)
    x = torch.randn((batch, m), generator=g)
    paths: dict[Any, Callable[[], Any]] = {"dense": lambda: torch.nn.functional.linear(x, W)}
    for k in counts:
        if k:
            run = _bsr_product(torch, shape, block, k, fmt, seed)[0]
            paths[k] = lambda run=run: run(x)
    best = dict.fromkeys(paths, float("inf"))
    rounds = 0
    with torch.no_grad():
        for fn in paths.values():                      # warm-up (allocations, MKL setup)
            fn()
        start = time.perf_counter()
        while rounds < max_reps and (rounds < min_reps
                                     or time.perf_counter() - start < max_seconds):
            for key, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t0)
            rounds += 1
    return KernelTimes(dense=best.pop("dense"),
                       bsr={k: best.get(k, 0.0) if k else 0.0 for k in counts},
                       rounds=rounds)
