"""Hostile result files and tampered parts (issue 15, "hostile result files" and "tampered
parts"): every crafted file ends in a FormatError naming the file (and the layer, where one
is at fault), exit 1 from the CLI, within seconds and bounded memory; a tampered part of a
streamed run is recomputed on resume or refused by assembly, never copied into a result.

The result-file cases run in a subprocess under ``RLIMIT_AS`` (1 GiB): loading, inspecting
and showing each one must fail cleanly there, whatever the file claims.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from regroup import FormatError, RegroupError, from_array, regroup_checkpoint, regroup_pattern
from regroup import _zip
from regroup import pipeline
from regroup import result as result_mod
from regroup.io import write_safetensors
from regroup.result import assemble_result, check_result, load_part, load_result, read_meta, \
    save_part, save_result

AS_LIMIT = 1 << 30          # address space of the subprocess that reads a hostile file
MAX_SECONDS = 10.0
LAYER = "fc.weight"
N, M, BLOCK = 64, 96, 8


# -- a valid result, as entries ------------------------------------------------------------
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _weights() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, M)) * (rng.random((N, M)) < 0.2)


@functools.lru_cache(maxsize=None)
def _valid(fmt: str) -> tuple[tuple[str, bytes], ...]:
    """The entries of a valid result file of one layer ``LAYER`` in format ``fmt``."""
    r = regroup_pattern(from_array(_weights(), name=LAYER), block=BLOCK, format=fmt,
                        method="sort")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.npz"
        save_result(path, [r], {"options": {"seed": 0}, "versions": {"regroup": "x"}})
        with zipfile.ZipFile(path) as zf:
            return tuple((i.filename, zf.read(i)) for i in zf.infolist())


def _entries(fmt: str = "grid") -> dict[str, bytes]:
    return dict(_valid(fmt))


def _meta(entries: dict[str, bytes]) -> dict:
    return json.loads(entries["meta.json"])


def _set_meta(entries: dict[str, bytes], doc) -> dict[str, bytes]:
    return {**entries, "meta.json": json.dumps(doc).encode()}


def _layer(entries: dict[str, bytes], **changes) -> dict[str, bytes]:
    doc = _meta(entries)
    doc["layers"][0].update(changes)
    return _set_meta(entries, doc)


def _array(entries: dict[str, bytes], name: str) -> np.ndarray:
    return np.load(io.BytesIO(entries["layers/0/" + name]))


def _with(entries: dict[str, bytes], name: str, data: bytes | np.ndarray | None):
    out = dict(entries)
    if data is None:
        del out["layers/0/" + name]
    else:
        out["layers/0/" + name] = data if isinstance(data, bytes) else _npy(data)
    return out


def _write(path: Path, entries: dict[str, bytes], *, seal: bool = False) -> Path:
    with open(path, "wb") as f, _zip.ZipWriter(f, seal=seal) as zw:
        for name, data in entries.items():
            zw.write(name, data)
    return path


@functools.lru_cache(maxsize=None)
def _deflated(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix`` and ``zeros`` zero bytes (a bomb: ~1000x), and
    the CRC-32 of what it inflates to."""
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    chunk, parts = bytes(1 << 24), [comp.compress(prefix)]
    crc = zlib.crc32(prefix)
    for left in range(zeros, 0, -len(chunk)):
        piece = chunk[:min(left, len(chunk))]
        parts.append(comp.compress(piece))
        crc = zlib.crc32(piece, crc)
    parts.append(comp.flush())
    return b"".join(parts), crc


def _write_forged(path: Path, entries: dict[str, bytes], name: str, stream: bytes, crc: int,
                  size: int) -> Path:
    """``entries`` with ``name`` replaced by the raw deflate ``stream``, its CRC and
    inflated size declared as ``crc`` and ``size`` (claims the stream need not keep)."""
    with open(path, "wb") as f, _zip.ZipWriter(f) as zw:
        for n, data in entries.items():
            if n == name:
                zw.write_raw(n, crc, size, len(stream), [stream])
            else:
                zw.write(n, data)
    return path


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


# -- the hostile result files ----------------------------------------------------------------
def _meta_bomb_declared(p: Path) -> Path:
    """A 200 MB meta.json of spaces (~200 KB deflated), its size declared honestly."""
    stream, crc = _deflated(b"", 200 << 20)
    return _write_forged(p, _entries(), "meta.json", stream, crc, 200 << 20)


def _meta_bomb_forged(p: Path) -> Path:
    """The same stream, declared as 2 GB (more than the stream can inflate to)."""
    stream, crc = _deflated(b"", 200 << 20)
    return _write_forged(p, _entries(), "meta.json", stream, crc, 2 << 30)


def _meta_bomb_small_claim(p: Path) -> Path:
    """A 200 MB stream declared as 1 KB: reading stops at the claim."""
    stream, _ = _deflated(b"", 200 << 20)
    return _write_forged(p, _entries(), "meta.json", stream, zlib.crc32(bytes(1024)), 1024)


def _mask_bomb(p: Path) -> Path:
    """A 3 GB mask declared for a 64x96 layer."""
    stream, crc = _deflated(_npy_header("|b1", (N, M)), 200 << 20)
    return _write_forged(p, _entries(), "layers/0/mask.npy", stream, crc, 3 << 30)


def _mask_bomb_honest_size(p: Path) -> Path:
    """A 200 MB mask (its size declared honestly) for a 64x96 layer."""
    head = _npy_header("|b1", (N, M))
    stream, crc = _deflated(head, 200 << 20)
    return _write_forged(p, _entries(), "layers/0/mask.npy", stream, crc,
                         len(head) + (200 << 20))


def _mask_bomb_small_claim(p: Path) -> Path:
    """A 200 MB mask stream declared as exactly a 64x96 mask (CRC of that prefix): read up
    to the claim only, then refused (all zeros: no kept block, as the metrics say)."""
    head = _npy_header("|b1", (N, M))
    stream, _ = _deflated(head, 200 << 20)
    return _write_forged(p, _entries(), "layers/0/mask.npy", stream,
                         zlib.crc32(bytes(N * M), zlib.crc32(head)), len(head) + N * M)


def _huge_layer(p: Path) -> Path:
    """A layer claiming a 3 GiB mask (shape and entry agree; the stream is small)."""
    n, m = 1 << 16, 3 << 14
    e = _layer(_entries(), shape=[n, m])
    e = _with(e, "row_perm.npy", np.arange(n, dtype=np.int64))
    e = _with(e, "col_perm.npy", np.arange(m, dtype=np.int64))
    head = _npy_header("|b1", (n, m))
    stream, crc = _deflated(head, 1 << 20)
    return _write_forged(p, e, "layers/0/mask.npy", stream, crc, len(head) + n * m)


def _structured_dtype(p: Path) -> Path:
    rp = _array(_entries(), "row_perm.npy")
    return _write(p, _with(_entries(), "row_perm.npy",
                           rp.astype([("a", "<i8")])))


def _object_dtype(p: Path) -> Path:
    return _write(p, _with(_entries(), "row_perm.npy", np.array([None] * N, dtype=object)))


def _int_mask(p: Path) -> Path:
    return _write(p, _with(_entries(), "mask.npy", _array(_entries(), "mask.npy").astype(np.uint8)))


def _mask_3x3(p: Path) -> Path:
    return _write(p, _with(_entries(), "mask.npy", np.ones((3, 3), bool)))


def _fortran_mask(p: Path) -> Path:
    return _write(p, _with(_entries(), "mask.npy",
                           np.asfortranarray(_array(_entries(), "mask.npy"))))


def _perm(name: str, fn):
    def build(p: Path, fmt: str = "grid") -> Path:
        e = _entries(fmt)
        return _write(p, _with(e, name, fn(_array(e, name))))
    return build


def _ptr(fn):
    def build(p: Path) -> Path:
        e = _entries("shuffled")
        return _write(p, _with(e, "panel_ptr.npy", fn(_array(e, "panel_ptr.npy"))))
    return build


def _flip_bit(p: Path) -> Path:
    mask = _array(_entries(), "mask.npy").copy()
    mask[3, 5] = ~mask[3, 5]
    return _write(p, _with(_entries(), "mask.npy", mask))


def _all_true(p: Path) -> Path:
    return _write(p, _with(_entries(), "mask.npy", np.ones((N, M), bool)))


def _shuffled_flip(p: Path) -> Path:
    e = _entries("shuffled")
    mask = _array(e, "mask.npy").copy()
    mask[0] = ~mask[0]
    return _write(p, _with(e, "mask.npy", mask))


def _dup_panel_col(p: Path) -> Path:
    e = _entries("shuffled")
    cols = _array(e, "panel_cols.npy").copy()
    cols[1] = cols[0]
    return _write(p, _with(e, "panel_cols.npy", cols))


def _many_layers(p: Path) -> Path:
    rec = _meta(_entries())["layers"][0]
    layers = [{**rec, "name": f"l{i}", "entry": f"layers/{i}/", "metrics": {}}
              for i in range(100_000)]
    return _write(p, _set_meta(_entries(), {"format_version": 1, "layers": layers}))


def _duplicate_names(p: Path) -> Path:
    e = _entries()
    doc = _meta(e)
    doc["layers"].append({**doc["layers"][0], "entry": "layers/1/"})
    e = _set_meta(e, doc)
    for k in [k for k in e if k.startswith("layers/0/")]:
        e["layers/1/" + k[len("layers/0/"):]] = e[k]
    return _write(p, e)


def _meta_doc(fn):
    def build(p: Path) -> Path:
        doc = _meta(_entries())
        return _write(p, _set_meta(_entries(), fn(doc)))
    return build


def _raw_meta(data: bytes):
    def build(p: Path) -> Path:
        return _write(p, {**_entries(), "meta.json": data})
    return build


def _huge_npy_header(p: Path) -> Path:
    """An npy header claiming 60000 bytes (the entry itself is small)."""
    data = b"\x93NUMPY\x01\x00" + (60_000).to_bytes(2, "little") + b" " * 200
    return _write(p, _with(_entries(), "row_perm.npy", data))


def _not_npy(p: Path) -> Path:
    return _write(p, _with(_entries(), "row_perm.npy", b"PK\x03\x04 not an array" * 50))


def _duplicate_entry(p: Path) -> Path:
    _write(p, _entries())
    raw = p.read_bytes()
    # Rename col_perm.npy to row_perm.npy in both headers (same length names).
    return Path(p.write_bytes(raw.replace(b"layers/0/col_perm.npy", b"layers/0/row_perm.npy"))
                and p)


def _huge_directory(p: Path) -> Path:
    _write(p, _entries())
    raw = bytearray(p.read_bytes())
    raw[-10:-6] = (0xFFFF_FFF0).to_bytes(4, "little")   # end record: directory size
    p.write_bytes(bytes(raw))
    return p


def _central_header(raw: bytearray, name: bytes) -> int:
    """The offset of the central directory header of entry ``name`` in ``raw``."""
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")] != name:
        at = raw.find(b"PK\x01\x02", at + 46)
    return at


def _bad_crc(p: Path) -> Path:
    _write(p, _entries())
    raw = bytearray(p.read_bytes())
    raw[_central_header(raw, b"layers/0/row_perm.npy") + 16] ^= 0xFF     # its CRC-32
    p.write_bytes(bytes(raw))
    return p


def _encrypted(p: Path) -> Path:
    """mask.npy flagged as encrypted in its central directory header."""
    _write(p, _entries())
    raw = bytearray(p.read_bytes())
    raw[_central_header(raw, b"layers/0/mask.npy") + 8] |= 1
    p.write_bytes(bytes(raw))
    return p


def _bzip2(p: Path) -> Path:
    """mask.npy declared as compressed with bzip2 (method 12)."""
    _write(p, _entries())
    raw = bytearray(p.read_bytes())
    at = _central_header(raw, b"layers/0/mask.npy")
    raw[at + 10:at + 12] = (12).to_bytes(2, "little")
    p.write_bytes(bytes(raw))
    return p


def _truncated_mask(p: Path) -> Path:
    good = _entries()["layers/0/mask.npy"]
    head = _npy_header("|b1", (N, M))
    body = good[len(head):len(head) + 100]
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = comp.compress(head + body) + comp.flush()
    return _write_forged(p, _entries(), "layers/0/mask.npy", stream,
                         zlib.crc32(head + body), len(good))


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


# (id, builder, message pattern, whether the layer must be named)
_LAYER = f"layer '{LAYER}'"
CASES = [
    ("meta-bomb-200MB", _meta_bomb_declared, r"meta\.json.*declares 209715200 bytes", False),
    ("meta-bomb-2GB-forged", _meta_bomb_forged, r"meta\.json.*declares 2147483648", False),
    ("meta-bomb-small-claim", _meta_bomb_small_claim, r"corrupt meta\.json", False),
    ("mask-bomb-3GB", _mask_bomb, r"mask\.npy.*declares 3221225472 bytes, expected at most",
     True),
    ("mask-bomb-200MB", _mask_bomb_honest_size, r"mask\.npy.*declares 209715328", True),
    ("mask-bomb-small-claim", _mask_bomb_small_claim, r"metrics say kept_blocks", True),
    ("huge-layer-3GiB", _huge_layer, r"needs \d+ bytes|more than its \d+ deflated", True),
    ("structured-dtype", _structured_dtype, r"row_perm\.npy.*holds dtype", True),
    ("object-dtype", _object_dtype, r"row_perm\.npy.*holds dtype", True),
    ("uint8-mask", _int_mask, r"mask\.npy.*holds dtype", True),
    ("mask-3x3", _mask_3x3, r"mask\.npy.*shape \(3, 3\), expected \(64, 96\)", True),
    ("fortran-mask", _fortran_mask, r"Fortran order", True),
    ("row-perm-out-of-range", _perm("row_perm.npy", lambda a: a + 5), r"outside 0\.\.63",
     True),
    ("row-perm-negative", _perm("row_perm.npy", lambda a: a - 1), r"outside 0\.\.63", True),
    ("row-perm-zeros", _perm("row_perm.npy", np.zeros_like), r"not a permutation", True),
    ("col-perm-short", _perm("col_perm.npy", lambda a: a[:-1]), r"shape \(95,\)", True),
    ("col-perm-duplicates", _perm("col_perm.npy", lambda a: np.r_[a[:-1], a[0]]),
     r"col_perm is not a permutation", True),
    ("panel-ptr-huge-values", _ptr(lambda a: a * 10**12), r"panel_ptr must rise", True),
    ("panel-ptr-huge-shape", _ptr(lambda a: np.zeros(10**6, np.int64)),
     r"panel_ptr\.npy' declares 8000128 bytes", True),
    ("panel-ptr-decreasing", _ptr(lambda a: a[::-1].copy()), r"panel_ptr must rise", True),
    ("panel-col-twice", _dup_panel_col, r"lists column \d+ twice|not whole tiles", True),
    ("grid-mask-not-blocks", _flip_bit, r"not the union of its layout's blocks", True),
    ("all-true-mask", _all_true, r"metrics say kept_blocks", True),
    ("shuffled-mask-not-tiles", _shuffled_flip, r"not the union", True),
    ("100k-layers", _many_layers, r"100000 layers, more than", False),
    ("duplicate-names", _duplicate_names, r"layer 'fc\.weight' appears twice", True),
    ("missing-mask", lambda p: _write(p, _with(_entries(), "mask.npy", None)),
     r"entry 'layers/0/mask\.npy' is missing", True),
    ("missing-col-perm", lambda p: _write(p, _with(_entries(), "col_perm.npy", None)),
     r"col_perm\.npy' is missing", True),
    ("unknown-format", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                            "format": "diagonal"}]}),
     r"format 'diagonal'", True),
    ("negative-shape", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                            "shape": [-64, 96]}]}),
     r"shape \[-64, 96\], expected", True),
    ("bool-shape", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                        "shape": [True, 96]}]}),
     r"shape \[True, 96\]", True),
    ("3d-shape", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                      "shape": [64, 96, 1]}]}),
     r"expected 2 or 4", True),
    ("zero-block", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                        "block_shape": [0, 8]}]}),
     r"block_shape \[0, 8\]", True),
    ("name-not-str", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                          "name": ["x"]}]}),
     r"layer 0: its name is \['x'\]", False),
    ("entry-elsewhere", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                             "entry": "../x/"}]}),
     r"entry '\.\./x/', expected 'layers/0/'", True),
    ("metrics-string-count", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
         "metrics": {**d["layers"][0]["metrics"], "kept_blocks": "many"}}]}),
     r"kept_blocks 'many'", True),
    ("seed-string", _meta_doc(lambda d: {**d, "layers": [{**d["layers"][0],
                                                          "seed": "0"}]}), r"seed '0'", True),
    ("options-not-dict", _meta_doc(lambda d: {**d, "options": [1]}), r"'options' is \[1\]",
     False),
    ("skipped-malformed", _meta_doc(lambda d: {**d, "skipped": [5]}), r"'skipped' holds 5",
     False),
    ("layers-not-list", _meta_doc(lambda d: {**d, "layers": {"a": 1}}), r"'layers' is", False),
    ("future-version", _meta_doc(lambda d: {**d, "format_version": 99}),
     r"format version 99 is not supported", False),
    ("meta-not-object", _raw_meta(b"[1, 2]"), r"corrupt meta\.json: a list", False),
    ("meta-deep-nesting", _raw_meta(b"[" * 100_000 + b"]" * 100_000),
     r"corrupt meta\.json: RecursionError", False),
    ("meta-bad-utf8", _raw_meta(b'{"format_version": 1, "\xff": 1}'), r"corrupt meta\.json",
     False),
    ("huge-npy-header", _huge_npy_header, r"npy header of 60000 bytes", True),
    ("not-npy", _not_npy, r"not an npy array", True),
    ("duplicate-entry", _duplicate_entry, r"appears twice", False),
    ("huge-directory", _huge_directory, r"zip directory declares 4294967280 bytes", False),
    ("bad-crc", _bad_crc, r"row_perm\.npy' is damaged \(BadZipFile: Bad CRC", True),
    ("encrypted", _encrypted, r"mask\.npy' is encrypted", True),
    ("bzip2", _bzip2, r"compression method 12", True),
    ("truncated-mask", _truncated_mask, r"mask\.npy' (ends after|is damaged)", True),
    ("not-a-zip", lambda p: Path(p.write_bytes(b"\x93NUMPY" + b"x" * 500) and p),
     r"not a regroup result file \(not a zip archive", False),
    ("fifo", _fifo, r"not a regular file", False),
]


def _run_limited(runner, tmp_path: Path, *commands: list[str]) -> tuple[list[dict], float]:
    """Run ``commands`` (``["load", path]`` or CLI arguments), each in a forked child
    allowed AS_LIMIT bytes of address space beyond the runner's; their outcomes and the
    largest peak RSS (MB)."""
    out, rss = [], 0.0
    for k, argv in enumerate(commands):
        logs = tmp_path / f"logs{k}"
        logs.mkdir()
        if argv[0] == "load":
            got = runner.run(tmp_path, logs, op="load", params={"path": argv[1]},
                             rss_mb=AS_LIMIT >> 20, seconds=60)
            got.update(json.loads((logs / "op.json").read_text()))
        else:
            got = runner.run(tmp_path, logs, argv=argv, rss_mb=AS_LIMIT >> 20, seconds=60)
            got["message"] = (logs / "stderr").read_text()
        assert not got["timed_out"] and "Traceback" not in got.get("message", ""), got
        rss = max(rss, got["maxrss_mb"])
        out.append(got)
    return out, rss


@pytest.mark.parametrize("case, build, pattern, names_layer", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_result_file_fails_cleanly(hostile_runner, tmp_path, case, build, pattern,
                                             names_layer):
    path = build(tmp_path / "r.regroup.npz")
    where = re.escape(str(path)) + (r": layer 'fc\.weight'" if names_layer else "")
    commands = [["load", str(path)], ["inspect", str(path)]]
    show = case in ("mask-bomb-3GB", "all-true-mask", "row-perm-zeros", "meta-bomb-2GB-forged")
    if show:
        np.savez(tmp_path / "w.npz", **{LAYER: _weights()})
        commands.append(["show", str(tmp_path / "w.npz"), "--result", str(path), "-o",
                         str(tmp_path / "o.png"), "--block", str(BLOCK)])
    runs, rss = _run_limited(hostile_runner, tmp_path, *commands)
    assert rss < AS_LIMIT >> 20
    for command, got in zip(commands, runs):
        assert got["seconds"] < MAX_SECONDS, (command, got)
        if command[0] == "load":
            assert got["error"] == "FormatError", got
        else:
            assert got["exit"] == 1 and "internal error" not in got["message"], got
        assert re.search(where, got["message"]), (command, got["message"])
        assert re.search(pattern, got["message"]), (command, got["message"])
    assert not (tmp_path / "o.png").exists()


def test_read_meta_is_bounded_too(tmp_path):
    assert read_meta(_meta_bomb_declared(tmp_path / "a.npz")) is None
    assert read_meta(_huge_directory(tmp_path / "b.npz")) is None
    assert read_meta(_write(tmp_path / "c.npz", _entries()))["format_version"] == 1


def test_the_entry_count_is_limited(tmp_path, monkeypatch):
    path = _write(tmp_path / "r.npz", _entries())
    monkeypatch.setattr(result_mod, "MAX_ENTRIES", 3)
    with pytest.raises(FormatError, match=r"r\.npz: 4 zip entries, more than .* \(3\)"):
        load_result(path)


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_valid_files_still_load_and_check(tmp_path, fmt):
    path = _write(tmp_path / "r.npz", _entries(fmt))
    res = load_result(path)
    assert list(res) == [LAYER] and res[LAYER].mask.shape == (N, M)
    assert check_result(path)["layers"][0]["name"] == LAYER
    rp = res[LAYER].row_perm
    assert sorted(rp.tolist()) == list(range(N))


# -- tampered parts ----------------------------------------------------------------------------
OPTS = dict(block=8, method="sort", seed=0)


def _model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(3):
        w = rng.standard_normal((48, 40)).astype(np.float32)
        w[rng.random(w.shape) < 0.8] = 0
        tensors[f"l{i}.weight"] = w
    src = tmp_path / "m.safetensors"
    write_safetensors(tensors, src)
    return src


def _part_entries(part: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(part) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _reseal(part: Path, entries: dict[str, bytes]) -> None:
    """Rewrite ``part`` with ``entries`` and a valid seal (as a forger would)."""
    _write(part, entries, seal=True)


def _tamper_layer(fn):
    def tamper(part: Path) -> None:
        e = _part_entries(part)
        doc = json.loads(e["meta.json"])
        n, m = doc["layers"][0]["shape"]
        _reseal(part, fn(e, doc, n, m))
    return tamper


def _set(name, make):
    return _tamper_layer(lambda e, doc, n, m: {**e, "layers/0/" + name: _npy(make(n, m))})


def _doc(fn):
    def change(e, doc, n, m):
        fn(doc)
        return {**e, "meta.json": json.dumps(doc).encode()}
    return _tamper_layer(change)


def _flip_a_byte(part: Path) -> None:
    raw = bytearray(part.read_bytes())
    raw[40] ^= 0xFF
    part.write_bytes(bytes(raw))


def _unsealed(part: Path) -> None:
    _write(part, _part_entries(part))


TAMPERS = [
    ("flipped-byte", _flip_a_byte),
    ("unsealed", _unsealed),
    ("all-true-mask", _set("mask.npy", lambda n, m: np.ones((n, m), bool))),
    ("mask-3x3", _set("mask.npy", lambda n, m: np.ones((3, 3), bool))),
    ("row-perm-zeros", _set("row_perm.npy", lambda n, m: np.zeros(n, np.int64))),
    ("missing-mask", _tamper_layer(lambda e, doc, n, m: {k: v for k, v in e.items()
                                                        if not k.endswith("mask.npy")})),
    ("status-skipped", _doc(lambda d: d.update(status="skipped", layers=d["layers"]))),
    ("status-unknown", _doc(lambda d: d.update(status="maybe"))),
    ("other-layer-name", _doc(lambda d: d["layers"][0].update(name="l9.weight"))),
    ("extra-entry", _tamper_layer(lambda e, doc, n, m: {**e, "../evil.npy": b"x",
                                                       "layers/0/../../evil": b"y"})),
    ("bad-seconds", _doc(lambda d: d.update(seconds="soon"))),
]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    src = _model(tmp)
    regroup_checkpoint(src, tmp / "fresh.npz", **OPTS)
    return (tmp / "fresh.npz").read_bytes()


def _interrupted(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A streamed run stopped after its first layer: (input, output, that layer's part)."""
    src = _model(tmp_path)
    out = tmp_path / "out.npz"

    def stop(name, done, total, info):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **OPTS, progress=stop)
    parts = list((tmp_path / "out.npz.parts").glob("*.npz"))
    assert len(parts) == 1
    return src, out, parts[0]


@pytest.mark.parametrize("tamper", [t[1] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_a_tampered_part_is_recomputed_on_resume(tmp_path, fresh, tamper):
    src, out, part = _interrupted(tmp_path)
    tamper(part)
    run = regroup_checkpoint(src, out, **OPTS)
    assert run.stats["resumed"] == 0                  # recomputed, not trusted
    assert out.read_bytes() == fresh
    with zipfile.ZipFile(out) as zf:
        assert not [n for n in zf.namelist() if ".." in n]


def test_an_intact_part_is_reused(tmp_path, fresh):
    src, out, part = _interrupted(tmp_path)
    assert regroup_checkpoint(src, out, **OPTS).stats["resumed"] == 1
    assert out.read_bytes() == fresh


@pytest.mark.parametrize("tamper", [t[1] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_assembly_refuses_a_tampered_part(tmp_path, tamper):
    src, out, part = _interrupted(tmp_path)
    layer = read_meta(part)["layers"][0]["name"]
    load_part(part, layer)                            # intact before
    tamper(part)
    with pytest.raises(FormatError, match=rf"{part.name}.*layer '{layer}' is damaged"):
        assemble_result(tmp_path / "asm.npz", [part], [layer], {})
    assert not (tmp_path / "asm.npz").exists()
    with pytest.raises(RegroupError, match=rf"{part.name}.*layer '{layer}' is damaged"):
        pipeline._first_layer(part, layer)            # a pass-1 part read by pass 2


def test_assembly_copies_only_the_expected_entries(tmp_path):
    r = regroup_pattern(from_array(_weights(), name=LAYER), block=BLOCK, method="sort")
    save_part(tmp_path / "0.npz", [r], {"status": "done"})
    assemble_result(tmp_path / "a.npz", [tmp_path / "0.npz"], [LAYER], {})
    save_result(tmp_path / "b.npz", [r])
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with pytest.raises(FormatError, match=r"layer 'other' is damaged .*expected only 'other'"):
        assemble_result(tmp_path / "c.npz", [tmp_path / "0.npz"], ["other"], {})


@pytest.mark.parametrize("limit, count_limit", [(_zip.LIMIT, _zip.COUNT_LIMIT), (1, 1)])
def test_a_seal_covers_every_byte_zip64_included(tmp_path, monkeypatch, limit, count_limit):
    monkeypatch.setattr(_zip, "LIMIT", limit)             # (1, 1): every zip64 record
    monkeypatch.setattr(_zip, "COUNT_LIMIT", count_limit)
    path = _write(tmp_path / "s.npz", _entries(), seal=True)
    with open(path, "rb") as fp:
        digest = _zip.check_seal(fp)
    assert path.read_bytes().endswith(_zip.SEAL_PREFIX + digest.encode())
    with zipfile.ZipFile(path) as zf:                      # still a plain zip archive
        assert zf.testzip() is None and zf.comment.startswith(_zip.SEAL_PREFIX)
    raw = path.read_bytes()
    for at in (0, len(raw) // 2, len(raw) - len(_zip.SEAL_PREFIX) - 65):
        bad = bytearray(raw)
        bad[at] ^= 1
        (tmp_path / "bad.npz").write_bytes(bytes(bad))
        with open(tmp_path / "bad.npz", "rb") as fp, pytest.raises(FormatError):
            _zip.check_seal(fp)
    with open(_write(tmp_path / "plain.npz", _entries()), "rb") as fp, \
            pytest.raises(FormatError, match="no content seal"):
        _zip.check_seal(fp)
