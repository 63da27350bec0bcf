import zipfile

import numpy as np
import pytest

from regroup import FormatError, check_layout, from_array, load_result, regroup_pattern, \
    save_result

from .conftest import random_mask


@pytest.fixture(params=["grid", "shuffled"])
def layers(request):
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((32, 4, 3, 3)) * (rng.random((32, 4, 3, 3)) < 0.2)
    return [regroup_pattern(from_array(random_mask(rng, 48, 40, 0.15), name="fc"), block=8,
                            format=request.param, method="metis"),
            regroup_pattern(from_array(conv, name="conv"), block=(8, 4),
                            format=request.param, method="auto")]


def test_round_trip_keeps_every_attribute(tmp_path, layers):
    save_result(tmp_path / "r.npz", layers, {"options": {"seed": 0}})
    res = load_result(tmp_path / "r.npz")
    assert list(res) == ["fc", "conv"] and res.meta["options"] == {"seed": 0}
    for a in layers:
        b = res[a.name]
        assert b.shape == a.shape and b.mask.shape == a.shape and b.mask.dtype == bool
        np.testing.assert_array_equal(b.mask, a.mask)
        np.testing.assert_array_equal(b.row_perm, a.row_perm)
        assert b.format == a.format and b.block_shape == a.block_shape
        assert b.metrics == a.metrics and b.method == a.method and b.seed == a.seed
        if a.format == "grid":
            np.testing.assert_array_equal(b.col_perm, a.col_perm)
        else:
            assert [c.tolist() for c in b.panel_cols] == [c.tolist() for c in a.panel_cols]
        check_layout(b.mask2d, b.format, b.block_shape, b.row_perm, b.col_perm, b.panel_cols)


def test_files_are_byte_identical(tmp_path, layers):
    save_result(tmp_path / "a.npz", layers)
    save_result(tmp_path / "b.npz", layers)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as z:     # readable by numpy too
        assert "meta.json" in z.namelist()
    assert np.load(tmp_path / "a.npz")["layers/0/mask"].dtype == bool


def test_corrupt_and_foreign_files(tmp_path, layers):
    save_result(tmp_path / "r.npz", layers)
    raw = (tmp_path / "r.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="trunc.npz: not a regroup result file"):
        load_result(tmp_path / "trunc.npz")
    np.savez(tmp_path / "plain.npz", x=np.ones(2))
    with pytest.raises(FormatError, match="plain.npz: not a regroup result file \\(no meta"):
        load_result(tmp_path / "plain.npz")


def test_future_format_version_is_refused(tmp_path, layers):
    save_result(tmp_path / "r.npz", layers, {"format_version": 99})   # cannot be overridden
    assert load_result(tmp_path / "r.npz").meta["format_version"] == 1
    with zipfile.ZipFile(tmp_path / "r.npz") as src, \
            zipfile.ZipFile(tmp_path / "v99.npz", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data.replace(b'"format_version": 1', b'"format_version": 99')
                         if name == "meta.json" else data)
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        load_result(tmp_path / "v99.npz")
