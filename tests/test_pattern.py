import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from regroup import RegroupError, from_array, from_sparse


def test_linear_weight_zeros_are_the_mask():
    w = np.array([[0.0, -2.0, 0.0], [3.0, 0.0, 0.5]])
    p = from_array(w, name="fc.weight")
    assert p.shape == (2, 3) and p.nnz == 3 and p.has_weights
    np.testing.assert_array_equal(p.matrix.toarray(), np.abs(w))


def test_explicit_mask_keeps_zero_weights_and_uses_orig_magnitudes():
    w = np.array([[0.0, -2.0], [3.0, 4.0]])
    m = np.array([[1.0, 0.0], [1.0, 1.0]])
    p = from_array(w, mask=m)
    assert p.nnz == 3
    np.testing.assert_array_equal(p.matrix.toarray(), [[0, 0], [3, 4]])


def test_bool_array_is_a_mask_without_weights():
    p = from_array(np.eye(3, dtype=bool))
    assert not p.has_weights and p.nnz == 3


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
       st.integers(0, 2**31 - 1))
def test_conv_flatten_and_back_is_exact(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * (rng.random(shape) < 0.5)
    p = from_array(w, name="conv.weight")
    assert p.matrix.shape == (shape[0], shape[1] * shape[2] * shape[3])
    back = p.unflatten(p.matrix.toarray())
    np.testing.assert_array_equal(back, np.abs(w))
    # im2col order: column index = (c * kh + i) * kw + j
    o, c, i, j = (s - 1 for s in shape)
    assert p.matrix[o, (c * shape[2] + i) * shape[3] + j] == abs(w[o, c, i, j])


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), (1, 2, 3, 4, 5)])
def test_wrong_ndim_is_refused(shape):
    with pytest.raises(RegroupError, match=r"takes 2-D \(Linear\) or 4-D"):
        from_array(np.ones(shape), name="x")


def test_nan_in_weight_is_refused():
    w = np.ones((2, 2))
    w[0, 1] = np.nan
    with pytest.raises(RegroupError, match="layer 'bad'.*NaN"):
        from_array(w, name="bad")


def test_nan_outside_the_mask_is_ignored():
    w = np.array([[np.nan, 1.0], [2.0, 3.0]])
    p = from_array(w, mask=np.array([[0, 1], [1, 1]]))
    assert p.nnz == 3


def test_from_sparse_binary_and_weighted():
    m = sp.csr_matrix(np.array([[0, -2.0], [1.0, 0]]))
    assert from_sparse(m).matrix.data.tolist() == [1.0, 1.0]
    assert from_sparse(m, has_weights=True).matrix.data.tolist() == [2.0, 1.0]
    with pytest.raises(TypeError, match="scipy sparse"):
        from_sparse(np.eye(2))


def test_complex_weights_are_refused_not_truncated():
    w = np.array([[1 + 2j, 0], [0, 3j]])
    with pytest.raises(TypeError, match="real numeric or boolean"):
        from_array(w, name="fc")


@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**16),
       st.sampled_from(["float16", "float32", "int8", "int64"]))
@settings(max_examples=40, deadline=None)
def test_from_array_matches_a_dense_reference(n, m, density, seed, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, m)) * 50 * (rng.random((n, m)) < density)).astype(dtype)
    p = from_array(w)
    ref = np.abs(w.astype(np.float64))
    assert p.matrix.has_sorted_indices and p.nnz == np.count_nonzero(w)
    np.testing.assert_array_equal(p.matrix.toarray(), ref)
