"""Synthetic weights with a planted block structure, hidden by random permutations.

Used for the bundled example, tests and benchmarks: the planted layout is known, so the
retained mass a perfect regrouping can reach is known too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validation import as_rng, check_block

__all__ = ["Planted", "planted_weights", "planted_mask", "oracle_retained",
           "example_state_dict"]


@dataclass(frozen=True, eq=False)
class Planted:
    """A planted weight matrix.

    Attributes
    ----------
    weight : ndarray of float32, shape (n, m)
        Magnitude-pruned weights (zeros are pruned).
    row_perm, col_perm : ndarray of intp
        ``weight[row_perm][:, col_perm]`` shows the planted blocks on the block grid.
    planted : ndarray of bool, shape (n // br, m // bc)
        Which blocks of that grid were planted dense.
    """

    weight: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray
    planted: np.ndarray


def planted_weights(n: int, m: int, *, block=32, block_density: float = 0.1,
                    sparsity: float = 0.9, contrast: float = 4.0, seed=0) -> Planted:
    """Weights whose large magnitudes sit in randomly chosen ``br x bc`` blocks.

    ``block_density`` of the blocks get weights ``contrast`` times larger; the matrix is
    then magnitude-pruned to ``sparsity`` and its rows and columns shuffled. With a high
    contrast the surviving weights sit mostly inside the planted blocks; noise outside
    stays, as in real magnitude-pruned layers.
    """
    br, bc = check_block(block, "planted_weights")
    rng = as_rng(seed)
    P, Q = n // br, m // bc
    planted = rng.random((P, Q)) < block_density
    w = rng.standard_normal((n, m)) * _block_grid(planted, br, bc, n, m, contrast, 1.0)
    k = int(round(sparsity * n * m))
    if k:
        thresh = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        w[np.abs(w) <= thresh] = 0.0
    return _hide(w, planted, rng)


def _hide(matrix: np.ndarray, planted: np.ndarray, rng: np.random.Generator) -> Planted:
    """Shuffle rows and columns; the permutations reveal the planted layout again."""
    n, m = matrix.shape
    row_perm = rng.permutation(n)
    col_perm = rng.permutation(m)
    shuffled = np.zeros((n, m), dtype=np.float32)
    shuffled[np.ix_(row_perm, col_perm)] = matrix
    return Planted(shuffled, row_perm.astype(np.intp), col_perm.astype(np.intp), planted)


def _block_grid(planted: np.ndarray, br: int, bc: int, n: int, m: int, inside, outside):
    P, Q = planted.shape
    out = np.full((n, m), outside, dtype=float)
    out[:P * br, :Q * bc] = np.where(np.repeat(np.repeat(planted, br, 0), bc, 1), inside,
                                     outside)
    return out


def planted_mask(n: int, m: int, *, block=32, block_density: float = 0.1,
                 fill: float = 0.9, noise: float = 0.01, seed=0) -> Planted:
    """A binary mask: ``block_density`` of the ``br x bc`` blocks are filled to ``fill``,
    every other position is kept with probability ``noise``; rows and columns are then
    shuffled. ``weight`` holds the mask as float32 ones (no magnitudes)."""
    br, bc = check_block(block, "planted_mask")
    rng = as_rng(seed)
    P, Q = n // br, m // bc
    planted = rng.random((P, Q)) < block_density
    prob = _block_grid(planted, br, bc, n, m, fill, noise)
    mask = rng.random((n, m)) < prob
    return _hide(mask, planted, rng)


def oracle_retained(planted: Planted, *, block=32, format: str = "grid",
                    budget="iso") -> float:
    """Retained of the hidden layout (the planted panels and column groups) under the same
    format and budget: the reference a regrouping should reach."""
    from .blocks import Budget, build_layout, layout_mask
    from .metrics import retained
    from .pattern import from_array

    pat = from_array(planted.weight != 0)
    V = pat.matrix
    lay = build_layout(V, planted.row_perm, planted.col_perm, check_block(block, "oracle"),
                       format, Budget.parse(budget), pat.nnz)
    return retained(V, layout_mask(lay))


def example_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """The bundled example (``regroup/data/example.npz``): a small pruned network's
    weights with planted block structure, a conv layer, a bias and a dense layer."""
    rng = np.random.default_rng(seed)
    conv = planted_weights(64, 16 * 9, block=16, block_density=0.15, sparsity=0.85,
                           seed=rng).weight.reshape(64, 16, 3, 3)
    return {
        "conv1.weight": conv,
        "fc1.weight": planted_weights(256, 576, block=32, block_density=0.12,
                                      sparsity=0.9, seed=rng).weight,
        "fc1.bias": rng.standard_normal(256).astype(np.float32),
        "fc2.weight": planted_weights(128, 256, block=32, block_density=0.15,
                                      sparsity=0.9, seed=rng).weight,
        "head.weight": rng.standard_normal((10, 128)).astype(np.float32),
    }
