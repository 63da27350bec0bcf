import io
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from regroup import FormatError, _zip, check_layout, from_array, load_result, \
    regroup_pattern, save_result
from regroup.result import assemble_result, save_part

from .conftest import random_mask


@pytest.fixture(params=["grid", "shuffled", "nm"])
def layers(request):
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((32, 4, 3, 3)) * (rng.random((32, 4, 3, 3)) < 0.2)
    fc = from_array(random_mask(rng, 48, 40, 0.15), name="fc")
    if request.param == "nm":    # N:M has its own searches and no block
        return [regroup_pattern(fc, format="nm", nm="1:4", method="asp"),
                regroup_pattern(from_array(conv, name="conv"), format="nm", nm="2:4")]
    return [regroup_pattern(fc, block=8, format=request.param, method="metis"),
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
        assert b.nm == a.nm
        if a.format in ("grid", "nm"):
            np.testing.assert_array_equal(b.col_perm, a.col_perm)
        else:
            assert [c.tolist() for c in b.panel_cols] == [c.tolist() for c in a.panel_cols]
        check_layout(b.mask2d, b.format, b.block_shape, b.row_perm, b.col_perm, b.panel_cols,
                     nm=b.nm)


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


def test_an_assembled_file_equals_the_saved_file(tmp_path, layers):
    """Assembling copies the parts' compressed arrays; the bytes equal save_result's."""
    parts = [tmp_path / f"{i}.npz" for i in range(len(layers))]
    for part, r in zip(parts, layers):
        save_part(part, [r], {"status": "done"})        # sealed, as a streamed run writes
    records = assemble_result(tmp_path / "asm.npz", parts, [r.name for r in layers],
                              {"options": {"seed": 0}})
    save_result(tmp_path / "one.npz", layers, {"options": {"seed": 0}})
    assert (tmp_path / "asm.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert [d["entry"] for d in records] == ["layers/0/", "layers/1/"]
    for a, b in zip(layers, load_result(tmp_path / "asm.npz").values()):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_result_files_are_plain_zip_archives(tmp_path, layers):
    save_result(tmp_path / "r.npz", layers)
    with zipfile.ZipFile(tmp_path / "r.npz") as zf:
        assert zf.testzip() is None                 # every CRC and local header checks out
        for info in zf.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.compress_type == zipfile.ZIP_DEFLATED and info.flag_bits == 0
            assert info.external_attr >> 16 == 0o100644 and info.extra == b""
    with np.load(tmp_path / "r.npz") as z:
        np.testing.assert_array_equal(z["layers/1/mask"], layers[1].mask)
    if shutil.which("unzip"):                       # Info-ZIP's own check
        subprocess.run(["unzip", "-tq", str(tmp_path / "r.npz")], check=True,
                       capture_output=True)


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


_ENTRIES = {"empty": b"", "meta.json": b'{"a": 1}', "x.npy": _npy(np.arange(200.0)),
            "zeros.npy": _npy(np.zeros(5000, bool)), "n\u00e4me": b"utf-8 name"}


@pytest.mark.parametrize("limit, count_limit", [
    (_zip.LIMIT, _zip.COUNT_LIMIT),     # as written in practice: no zip64 at all
    (_zip.LIMIT, len(_ENTRIES)),        # too many entries (65535 in practice)
    (400, _zip.COUNT_LIMIT),            # large entries, offsets, central directory (4 GiB)
    (1, 1),                             # everything
])
def test_zip64_exactly_where_a_value_reaches_its_limit(tmp_path, monkeypatch, limit,
                                                       count_limit):
    """The 4 GiB / 65535-entry limits lowered, so that zip64 is tested without 4 GiB."""
    monkeypatch.setattr(_zip, "LIMIT", limit)
    monkeypatch.setattr(_zip, "COUNT_LIMIT", count_limit)
    path = tmp_path / "a.npz"
    with open(path, "wb") as f, _zip.ZipWriter(f) as zw:
        for name, data in _ENTRIES.items():
            zw.write(name, data)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert {i.filename: zf.read(i) for i in zf.infolist()} == _ENTRIES
        assert zf.namelist() == list(_ENTRIES)
        infos = zf.infolist()
    for info in infos:
        big = info.file_size >= limit or info.compress_size >= limit
        local_extra = struct.unpack_from("<H", raw, info.header_offset + 28)[0]
        assert local_extra == (20 if big else 0)
        assert info.extra[:2] == (b"\x01\x00" if big or info.header_offset >= limit else b"")
    end64 = len(_ENTRIES) >= count_limit or len(raw) >= limit
    assert (raw[-42:-38] == b"PK\x06\x07") == end64       # the zip64 end locator
    with np.load(path) as z:
        np.testing.assert_array_equal(z["x"], np.arange(200.0))
    if shutil.which("unzip"):
        subprocess.run(["unzip", "-tq", str(path)], check=True, capture_output=True)
    # A copy of every entry's raw stream gives the same archive, zip64 headers included.
    assert _copy(path, tmp_path / "b.npz") == raw


def _copy(src, dst) -> bytes:
    with open(src, "rb") as fp, open(dst, "wb") as f, _zip.ZipWriter(f) as zw:
        for info in zipfile.ZipFile(fp).infolist():
            zw.write_raw(info.filename, info.CRC, info.file_size, info.compress_size,
                         _zip.raw_entry(fp, info))
    return dst.read_bytes()


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_a_raw_copy_checks_what_it_copies(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(_zip, "_CHUNK", chunk)              # read and inflate in pieces
    monkeypatch.setattr(_zip, "_INFLATE_CHUNK", max(chunk // 2, 1))
    path = tmp_path / "a.npz"
    with open(path, "wb") as f, _zip.ZipWriter(f) as zw:
        for name, data in _ENTRIES.items():
            zw.write(name, data)
    assert _copy(path, tmp_path / "b.npz") == path.read_bytes()
    with open(path, "rb") as fp:
        good = zipfile.ZipFile(fp).getinfo("zeros.npy")
        for change, why in [({"CRC": good.CRC ^ 1}, "bad CRC"),
                            ({"file_size": good.file_size + 1}, "bad CRC-32 or size"),
                            ({"compress_size": good.compress_size - 1}, "does not end"),
                            ({"compress_size": good.compress_size + 1}, "ends before"),
                            ({"header_offset": good.header_offset + 1}, "no local file"),
                            ({"filename": "x.npy", "orig_filename": "x.npy"}, "names another"),
                            ({"compress_type": zipfile.ZIP_STORED}, "not deflate")]:
            info = zipfile.ZipInfo(good.filename)
            for k in ("CRC", "file_size", "compress_size", "header_offset", "compress_type"):
                setattr(info, k, getattr(good, k))
            for k, v in change.items():
                setattr(info, k, v)
            with pytest.raises(FormatError, match=why):
                list(_zip.raw_entry(fp, info))
    raw = bytearray(path.read_bytes())                      # a damaged stream, as on disk
    raw[good.header_offset + 30 + len(good.filename) + 3] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(FormatError):
        _copy(tmp_path / "bad.npz", tmp_path / "c.npz")


def test_the_writer_refuses_what_it_cannot_write(tmp_path):
    with open(tmp_path / "a.zip", "wb") as f:
        zw = _zip.ZipWriter(f)
        zw.write("a", b"1")
        with pytest.raises(ValueError, match="duplicate"):
            zw.write("a", b"2")
        with pytest.raises(ValueError, match="announced"):
            zw.write_raw("b", 0, 0, 5, [b"\x03\x00"])
