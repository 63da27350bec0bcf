"""Planted structure: the hidden layout is the oracle auto must reach."""
import numpy as np
import pytest

from regroup import from_array, regroup_pattern
from regroup.synthetic import oracle_retained, planted_mask, planted_weights


def test_planted_mask_hides_its_blocks_under_permutations():
    pl = planted_mask(128, 192, block=32, block_density=0.3, fill=1.0, noise=0.0, seed=3)
    regrouped = (pl.weight != 0)[pl.row_perm][:, pl.col_perm]
    blocks = regrouped.reshape(4, 32, 6, 32).mean(axis=(1, 3))
    np.testing.assert_array_equal(blocks == 1.0, pl.planted)
    assert set(np.unique(blocks)) <= {0.0, 1.0}


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
@pytest.mark.parametrize("n,m,density,fill,noise", [
    (256, 512, 0.1, 0.9, 0.01), (512, 1024, 0.08, 0.7, 0.03), (256, 1024, 0.15, 0.95, 0.005)])
def test_auto_within_0005_of_the_oracle(fmt, n, m, density, fill, noise):
    pl = planted_mask(n, m, block=32, block_density=density, fill=fill, noise=noise, seed=1)
    r = regroup_pattern(from_array(pl.weight != 0), block=32, format=fmt, method="auto")
    assert r.metrics["retained"] >= oracle_retained(pl, block=32, format=fmt) - 0.005


def test_planted_weights_are_magnitude_pruned_to_the_sparsity():
    pl = planted_weights(64, 96, block=16, sparsity=0.8, seed=0)
    assert np.mean(pl.weight == 0) == pytest.approx(0.8, abs=1e-3)
