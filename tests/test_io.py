"""Readers and writers: golden files, round trips, and refusals of broken input."""
import os

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from regroup import FormatError, RegroupError, read_patterns
from regroup.io import (parse_smtx, read_safetensors, read_tensors, write_safetensors,
                        write_smtx)
from regroup.io.smtx import generate_smtx

GOLDEN_SMTX = ["3, 4, 4", "0 2 2 4", "0 3 1 2"]


def test_smtx_golden():
    m = parse_smtx(GOLDEN_SMTX)
    np.testing.assert_array_equal(m.toarray(), [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert list(generate_smtx(m)) == GOLDEN_SMTX


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.floats(0, 1), st.integers(0, 10**6))
def test_smtx_round_trip(n, m, density, seed):
    A = sp.random(n, m, density=density, random_state=seed, format="csr")
    back = parse_smtx(list(generate_smtx(A)))
    assert (back != (A != 0)).nnz == 0


@pytest.mark.parametrize("lines,match", [
    ([], r"<smtx>:1: empty file"),
    (["3, 4"], r"<smtx>:1:1: expected 'nrows, ncols, nnz'"),
    (["3, x, 4", "", ""], r"<smtx>:1:4: expected an integer, found 'x'"),
    (["3, 4, 4"], r"<smtx>:2: file ends before the row offsets \(truncated\?\)"),
    (["3, 4, 4", "0 2 2"], r"<smtx>:2: expected 4 row offsets, found 3"),
    (["3, 4, 4", "0 3 2 4", "0 1 2 3"], r"<smtx>:2: row offsets must rise"),
    (["3, 4, 4", "0 2 2 4"], r"<smtx>:3: file ends before the column indices"),
    (["3, 4, 4", "0 2 2 4", "0 3 1"], r"<smtx>:3: expected 4 column indices, found 3 "
                                      r"\(truncated\?\)"),
    (["3, 4, 4", "0 2 2 4", "0 9 1 2"], r"<smtx>:3: column index 9 \(entry 1\) is outside"),
    (["3, 4, 4", "0 2 2 4", "0 0 1 2"], r"duplicate column indices"),
    (["3, 4, 13", "", ""], r"nnz 13 exceeds nrows\*ncols"),
])
def test_smtx_errors_give_line_and_column(lines, match):
    with pytest.raises(FormatError, match=match):
        parse_smtx(lines)


def test_smtx_huge_declared_shape_is_refused_before_allocating(tmp_path):
    p = tmp_path / "huge.smtx"
    p.write_text("4000000000, 4000000000, 1\n0 1\n0\n")
    with pytest.raises(FormatError, match=r"huge.smtx:1: declared shape .* exceeds the limit"):
        read_patterns(p)


@pytest.mark.parametrize("kind", ["mtx", "smtx"])
@pytest.mark.parametrize("shape", [(10**9, 0), (0, 10**12)])
def test_a_zero_size_dimension_does_not_hide_a_huge_one(tmp_path, kind, shape):
    """Found by the fuzz suite: 10^9 x 0 passed the element limit (0 elements) and the
    reader built a 10^9 + 1 long CSR index (8 GB) before the empty-layer skip."""
    p = tmp_path / f"x.{kind}"
    n, m = shape
    p.write_text("%%MatrixMarket matrix coordinate real general\n"
                 f"{n} {m} 0\n" if kind == "mtx" else f"{n}, {m}, 0\n\n\n")
    with pytest.raises(FormatError, match=f"x.{kind}:[12]: declared shape {n}x{m} holds no"):
        read_patterns(p)


def test_safetensors_round_trip_and_bf16(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((4, 6)).astype(np.float32),
               "b.mask": rng.random((3, 3)) < 0.5, "c": np.arange(5, dtype=np.int64)}
    write_safetensors(tensors, tmp_path / "t.safetensors")
    back = read_safetensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    # bf16: the top 16 bits of a float32
    x = np.array([1.5, -2.25, 0.0], np.float32)
    _write_raw_bf16(tmp_path / "bf.safetensors", (x.view(np.uint32) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(read_safetensors(tmp_path / "bf.safetensors")["w"], x)


def _write_raw_bf16(path, u16):
    import json
    import struct
    head = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + u16.tobytes())


def test_safetensors_agrees_with_the_reference_library(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    arrs = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    st_np.save_file(arrs, tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(read_safetensors(tmp_path / "ref.safetensors")["x"], arrs["x"])


@pytest.mark.parametrize("blob,match", [
    (b"\x01\x02", "too short"),
    (b"\xff" * 8 + b"{}", "header length .* exceeds the file size"),
    ((10).to_bytes(8, "little") + b"not json!!", "corrupt safetensors header"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_safetensors_broken_headers(tmp_path, blob, match):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(FormatError, match=match):
        read_safetensors(p)


def test_safetensors_lying_offsets_and_shapes(tmp_path):
    import json
    import struct
    head = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000],
                             "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
    with pytest.raises(FormatError, match=r"tensor 'w' \(dtype F32, shape \[100000, 100000\]\)"
                                          r" has data offsets"):
        read_safetensors(p)


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)) * (rng.random((16, 8)) < 0.3)
    np.savez(tmp_path / "m.npz", fc=w, bias=np.ones(16))
    pats, skipped = read_patterns(tmp_path / "m.npz")
    assert [p.name for p in pats] == ["fc"] and skipped[0][0] == "bias"
    assert "1-D tensor" in skipped[0][1]
    np.save(tmp_path / "one.npy", w)
    assert read_patterns(tmp_path / "one.npy")[0][0].name == "one"


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="pickled objects are refused"):
        read_patterns(tmp_path / "obj.npy")


def test_npy_with_an_unknown_minor_version_is_refused_before_reading(tmp_path):
    # Version 1.1 does not exist; numpy would read a 4-byte header length (here 0.6 GB,
    # allocated before the read fails) where version 1.0 has 2 bytes.
    np.save(tmp_path / "v.npy", np.eye(20, 12, dtype=np.float32))
    raw = bytearray((tmp_path / "v.npy").read_bytes())
    raw[7] = 1
    (tmp_path / "v.npy").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="bad magic or version"):
        read_patterns(tmp_path / "v.npy")


def test_matrix_market_pattern_and_values(tmp_path):
    A = sp.random(20, 10, density=0.3, random_state=0, format="coo")
    scipy.io.mmwrite(tmp_path / "v.mtx", A)
    p = read_patterns(tmp_path / "v.mtx")[0][0]
    assert p.has_weights and p.nnz == A.nnz
    scipy.io.mmwrite(tmp_path / "p.mtx", A, field="pattern")
    assert not read_patterns(tmp_path / "p.mtx")[0][0].has_weights


@pytest.mark.parametrize("name,content,err,match", [
    ("missing.smtx", None, FileNotFoundError, "missing.smtx: no such file"),
    ("x.txt", b"hello", RegroupError, r"unknown file type '.txt'; supported: .smtx"),
    ("trunc.npz", b"PK\x03\x04garbage", FormatError, "not a valid .npz archive"),
    ("bad.mtx", b"%%MatrixMarket nonsense\n", FormatError,
     r"bad.mtx:1: expected '%%MatrixMarket matrix"),
])
def test_bad_files(tmp_path, name, content, err, match):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(err, match=match):
        read_patterns(p)


def test_no_usable_layer_says_why(tmp_path):
    np.savez(tmp_path / "d.npz", dense=np.ones((8, 8)), empty=np.zeros((8, 8)),
             vec=np.ones(3))
    with pytest.raises(RegroupError, match=r"d.npz: no usable layer: dense: fully dense.*"
                                           r"empty: empty.*vec: 1-D tensor"):
        read_patterns(tmp_path / "d.npz")


def test_layer_glob_and_no_match(tmp_path):
    rng = np.random.default_rng(0)
    mk = lambda: rng.standard_normal((8, 8)) * (rng.random((8, 8)) < 0.5)  # noqa: E731
    np.savez(tmp_path / "g.npz", **{"enc.fc1": mk(), "enc.fc2": mk(), "dec.fc1": mk()})
    pats, _ = read_patterns(tmp_path / "g.npz", layers="enc.*")
    assert [p.name for p in pats] == ["enc.fc1", "enc.fc2"]
    with pytest.raises(RegroupError, match=r"no layer matches 'x\*'; layers are: enc.fc1"):
        read_patterns(tmp_path / "g.npz", layers="x*")


def test_nan_layer_names_file_and_layer(tmp_path):
    w = np.ones((8, 8))
    w[1, 1] = np.nan
    np.savez(tmp_path / "n.npz", fc=w)
    with pytest.raises(RegroupError, match=r"n.npz: layer 'fc': weight contains NaN"):
        read_patterns(tmp_path / "n.npz")


def test_smtx_file_read(tmp_path):
    A = sp.random(12, 9, density=0.3, random_state=1, format="csr")
    write_smtx(A, tmp_path / "a.smtx")
    pats, _ = read_patterns(tmp_path / "a.smtx")
    assert pats[0].name == "a" and pats[0].nnz == A.nnz
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert read_tensors(tmp_path / "a.smtx")["a"].shape == (12, 9)


def test_result_file_is_not_taken_for_a_mask(tmp_path):
    from regroup import from_array, regroup_pattern, save_result
    rng = np.random.default_rng(0)
    r = regroup_pattern(from_array(rng.random((16, 16)) < 0.3), block=4, method="identity")
    save_result(tmp_path / "r.npz", [r])
    with pytest.raises(RegroupError, match="r.npz: is a regroup result file"):
        read_patterns(tmp_path / "r.npz")


@pytest.mark.parametrize("kwargs", [{}, {"field": "pattern"}, {"symmetry": "symmetric"},
                                    {"field": "integer"}, {"symmetry": "skew-symmetric"}])
def test_matrix_market_parser_agrees_with_scipy(tmp_path, kwargs):
    from regroup.io import read_mtx
    A = sp.random(12, 12, density=0.3, random_state=3, format="coo")
    if kwargs.get("field") == "integer":
        A.data = np.round(A.data * 10) + 1
    if kwargs.get("symmetry") == "symmetric":
        A = sp.coo_matrix(sp.triu(A + A.T))
    if kwargs.get("symmetry") == "skew-symmetric":
        A = sp.coo_matrix(sp.triu(A - A.T, k=1) - sp.triu(A - A.T, k=1).T)
    scipy.io.mmwrite(tmp_path / "x.mtx", A, **kwargs)
    ours, has_values = read_mtx(tmp_path / "x.mtx")
    ref = sp.csr_matrix(scipy.io.mmread(tmp_path / "x.mtx"))
    np.testing.assert_allclose(ours.toarray(), ref.toarray())
    assert has_values == (kwargs.get("field") != "pattern")


def test_matrix_market_dense_array(tmp_path):
    from regroup.io import read_mtx
    A = np.arange(6, dtype=float).reshape(2, 3)
    scipy.io.mmwrite(tmp_path / "d.mtx", A)
    np.testing.assert_array_equal(read_mtx(tmp_path / "d.mtx")[0].toarray(), A)


def _valid_files(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 12)) * (rng.random((20, 12)) < 0.3)
    write_smtx(sp.csr_matrix(w), tmp_path / "v.smtx")
    np.savez(tmp_path / "v.npz", fc=w)
    np.save(tmp_path / "v.npy", w)
    write_safetensors({"fc": w.astype(np.float32)}, tmp_path / "v.safetensors")
    scipy.io.mmwrite(tmp_path / "v.mtx", sp.coo_matrix(w))
    return {p.suffix: p.read_bytes() for p in tmp_path.iterdir()}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([".smtx", ".npz", ".npy", ".safetensors", ".mtx"]),
       st.integers(0, 10**6), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                       max_size=6), st.booleans())
def test_damaged_files_end_in_a_documented_error(tmp_path_factory, suffix, cut, flips,
                                                 truncate):
    """Truncated or corrupted files: a valid result or FormatError/RegroupError, never
    another exception (scipy's MatrixMarket reader segfaulted on such input)."""
    d = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(_valid_files(d)[suffix])
    if truncate:
        raw = raw[:cut % (len(raw) + 1)]
    for pos, val in flips:
        if raw:
            raw[pos % len(raw)] = val
    p = d / f"x{suffix}"
    p.write_bytes(bytes(raw))
    try:
        read_patterns(p)
    except RegroupError:
        pass
