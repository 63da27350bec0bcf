"""Hostile inputs (issue 15, "inputs" slice): non-regular files, inputs changed during a
run, stride-0 / sparse / meta tensors, many tiny tensors, shard indexes that disagree with
their shards, deep nesting and overflowing option values, names with control characters.

Every refused case ends in the documented error - exit 1 naming the file (and the tensor,
where one is at fault), exit 2 only for a bad option - within seconds, with no result file
written and the input unchanged. Cases that used to hang run under an alarm, so that a
regression fails instead of blocking the suite.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import socket
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from regroup import FormatError, RegroupError, regroup_checkpoint, regroup_file
from regroup.validation import printable, safe_filename
from regroup.cli import main
from regroup.io import (index_file, read_npz_members, read_safetensors, read_tensors,
                        write_safetensors)
from regroup.options import RegroupOptions
from regroup.source import INDEX_NAME, open_source

SECONDS = 10          # the alarm: every case here ends well within it
OPTS = {"block": 8, "method": "sort"}


class Blocked(BaseException):
    """Raised by the alarm: a BaseException, so that no ``except Exception`` (nor
    ``except OSError``) in the code under test swallows it."""


@pytest.fixture(autouse=True)
def _alarm():
    """Fail a case that blocks (a FIFO opened for reading waits for a writer forever):
    the alarm fires after SECONDS, then every second until the case ends."""
    def fire(signum, frame):
        raise Blocked(f"blocked for more than {SECONDS} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, SECONDS, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _layer(seed: int = 0, shape=(32, 48), density: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    return w * (rng.random(shape) < density)


def _tensors() -> dict[str, np.ndarray]:
    return {f"l{i}.weight": _layer(i) for i in range(4)}


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (bytes) and every other entry (its kind)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = p.read_bytes() if p.is_file() and not p.is_symlink() else (
            "link" if p.is_symlink() else "dir" if p.is_dir() else "other")
    return out


def _cli(tmp_path: Path, capsys, argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in ``tmp_path``; return (exit code, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def _refused(tmp_path: Path, capsys, argv: list[str], code: int, *needles: str) -> str:
    """Assert the CLI ends with ``code``, one line on stderr holding ``needles``, and
    leaves every file under ``tmp_path`` as it was (no result, no parts)."""
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    got, out, err = _cli(tmp_path, capsys, argv)
    assert got == code, (got, err)
    assert time.perf_counter() - t0 < SECONDS
    line = err.strip().splitlines()[-1]
    for n in needles:
        assert n in line, (n, line)
    assert _snapshot(tmp_path) == before
    return line


def _sharded(folder: Path, tensors: dict[str, np.ndarray], n_shards: int = 2,
             weight_map: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``tensors`` over ``n_shards`` safetensors shards and an index (its
    ``weight_map`` replaced by ``weight_map`` when given); returns the true map."""
    folder.mkdir(exist_ok=True)
    names = sorted(tensors)
    true_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::n_shards]}
        write_safetensors(part, folder / shard)
        true_map.update(dict.fromkeys(part, shard))
    doc = {"metadata": {}, "weight_map": true_map if weight_map is None else weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(doc))
    return true_map


# == 1. non-regular files are refused before they are opened ==============================
def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _zero_device(p: Path) -> None:
    os.symlink("/dev/zero", p)          # endless bytes: a read would never finish


@contextlib.contextmanager
def _socket_at(p: Path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    try:
        yield
    finally:
        s.close()


@pytest.mark.parametrize("name", ["in.npy", "in.npz", "in.safetensors", "in.pt", "in.smtx",
                                  "in.mtx", "in.regroup.npz"])
@pytest.mark.parametrize("command", ["run", "inspect"])
def test_a_fifo_input_is_refused_without_blocking(tmp_path, capsys, name, command):
    _fifo(tmp_path / name)
    argv = [command, name] + (["-o", "out.npz", "-q"] if command == "run" else [])
    _refused(tmp_path, capsys, argv, 1, name, "FIFO", "not a regular file")
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "out.npz.parts").exists()


@pytest.mark.parametrize("argv, what", [
    (["compare", "ok.npy", "in.npy", "--block", "8"], "input 2"),
    (["show", "in.npy", "-o", "x.png"], "input"),
    (["show", "ok.npy", "--result", "in.npy", "-o", "x.png"], "--result file"),
    (["sweep", "in.npy", "--no-speed", "-q"], "input"),
])
def test_every_command_refuses_a_fifo_up_front(tmp_path, capsys, argv, what):
    np.save(tmp_path / "ok.npy", _layer())
    _fifo(tmp_path / "in.npy")
    _refused(tmp_path, capsys, argv, 1, "in.npy", f"the {what} is a FIFO")


def test_a_device_behind_a_link_is_refused(tmp_path, capsys):
    _zero_device(tmp_path / "zero.npy")
    _refused(tmp_path, capsys, ["run", "zero.npy", "-o", "out.npz", "-q"], 1, "zero.npy",
             "a character device")


def test_a_socket_input_is_refused(tmp_path, capsys):
    with _socket_at(tmp_path / "s.safetensors"):
        _refused(tmp_path, capsys, ["run", "s.safetensors", "-o", "out.npz", "-q"], 1,
                 "s.safetensors", "a socket")


@pytest.mark.parametrize("where", ["shard", "index", "index-in-dir", "shard-in-dir"])
def test_a_fifo_shard_or_index_is_refused(tmp_path, capsys, where):
    ck = tmp_path / "ck"
    true_map = _sharded(ck, _tensors())
    shard = sorted(set(true_map.values()))[1]
    if where == "shard":
        (ck / shard).unlink()
        _fifo(ck / shard)
        arg, needle = "ck", shard
    elif where in ("index", "index-in-dir"):
        (ck / INDEX_NAME).unlink()
        _fifo(ck / INDEX_NAME)
        arg, needle = ("ck/" + INDEX_NAME if where == "index" else "ck"), INDEX_NAME
    else:                                  # no index: every *.safetensors is a shard
        (ck / INDEX_NAME).unlink()
        (ck / shard).unlink()
        _fifo(ck / shard)
        arg, needle = "ck", shard
    _refused(tmp_path, capsys, ["run", arg, "-o", "out.npz", "-q", "--block", "8"], 1,
             needle, "FIFO")
    with pytest.raises(RegroupError, match="FIFO"):
        regroup_file(tmp_path / arg, **OPTS)


def test_readers_refuse_a_fifo_themselves(tmp_path):
    for name in ("a.npy", "a.npz", "a.safetensors", "a.smtx", "a.mtx"):
        _fifo(tmp_path / name)
        with pytest.raises(RegroupError, match=f"{name}: .*FIFO"):
            read_tensors(tmp_path / name)
        with pytest.raises(RegroupError, match="FIFO"):
            index_file(tmp_path / name)
    with pytest.raises(RegroupError, match="FIFO"):
        read_safetensors(tmp_path / "a.safetensors")


# == 2. an input changed during a run: no result under the old hash ======================
def _rewrite(path: Path, data: bytes, keep_stamp: bool) -> None:
    """Replace ``path``'s bytes in place (same inode); ``keep_stamp``: and restore its
    modification time, so that only the content (SHA-256) tells."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    if keep_stamp:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _changed_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: -v for k, v in tensors.items()}       # the same shapes and sizes


@pytest.mark.parametrize("entry", [regroup_checkpoint, regroup_file])
@pytest.mark.parametrize("keep_stamp", [False, True])
@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npy", "sharded"])
def test_an_input_rewritten_during_the_run_writes_no_result(tmp_path, fmt, keep_stamp,
                                                            entry):
    """The input is rewritten in place (same size) once the first layer is done; with
    ``keep_stamp`` its modification time is restored too, so that only its SHA-256,
    read again before the result is written, tells."""
    tensors = _tensors() if fmt != "npy" else {"m": _layer(0, (64, 48))}
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    if fmt == "sharded":
        _sharded(tmp_path / "ck", tensors)
        _sharded(new_dir / "ck", _changed_tensors(tensors))
        src, victim = tmp_path / "ck", tmp_path / "ck" / "model-00002-of-00002.safetensors"
        new = (new_dir / "ck" / victim.name).read_bytes()
    else:
        src = victim = tmp_path / f"m.{fmt}"
        other = new_dir / f"m.{fmt}"
        for path, t in ((src, tensors), (other, _changed_tensors(tensors))):
            if fmt == "safetensors":
                write_safetensors(t, path)
            elif fmt == "npz":
                np.savez(path, **t)
            else:
                np.save(path, t["m"])
        new = other.read_bytes()
    assert len(new) == victim.stat().st_size and new != victim.read_bytes()
    out = tmp_path / "out.npz"
    fired = []

    def progress(name, done, total, info):
        if not fired:
            fired.append(name)
            _rewrite(victim, new, keep_stamp)

    args = (src, out) if entry is regroup_checkpoint else (src,)
    with pytest.raises(RegroupError, match=r"input changed during the run.*no result"):
        entry(*args, **OPTS, progress=progress)
    assert fired and not out.exists() and victim.read_bytes() == new
    assert {p.name for p in tmp_path.iterdir()} <= {"m." + fmt, "ck", "new", "out.npz.parts"}


def test_a_replaced_input_is_named(tmp_path):
    src = tmp_path / "m.safetensors"
    write_safetensors(_tensors(), src)
    source = open_source(src)
    source.verify()                      # unchanged: passes
    os.replace(tmp_path / "m.safetensors", tmp_path / "old.safetensors")
    write_safetensors(_tensors(), src)   # the same bytes, another inode
    with pytest.raises(RegroupError, match=r"m\.safetensors: input changed during the run "
                       r"\(.*inode"):
        source.verify()
    src.unlink()
    _fifo(src)
    with pytest.raises(RegroupError, match="input changed during the run.*FIFO"):
        source.verify()


def _torch_files(tmp_path: Path) -> list[Path]:
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in _tensors().items()}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    return [tmp_path / "zip.pt", tmp_path / "legacy.pt"]


def test_every_format_is_hashed_from_the_bytes_it_is_read_from(tmp_path):
    from regroup.io import write_smtx
    import scipy.sparse as sp
    t = _tensors()
    write_safetensors(t, tmp_path / "a.safetensors")
    np.savez(tmp_path / "a.npz", **t)
    np.save(tmp_path / "a.npy", t["l0.weight"])
    np.save(tmp_path / "f.npy", np.asfortranarray(t["l1.weight"]))
    write_smtx(sp.csr_matrix(t["l2.weight"]), tmp_path / "a.smtx")
    (tmp_path / "a.mtx").write_text("%%MatrixMarket matrix coordinate real general\n"
                                    "3 4 2\n1 1 0.5\n3 4 -2\n")
    files = [tmp_path / n for n in ("a.safetensors", "a.npz", "a.npy", "f.npy", "a.smtx",
                                    "a.mtx")]
    with contextlib.suppress(pytest.skip.Exception):
        files += _torch_files(tmp_path)
    for path in files:
        before = path.read_bytes()
        shapes, tensors, record, members = index_file(path)
        assert (members is not None) == (path.suffix == ".npz")
        assert record.sha256 == hashlib.sha256(before).hexdigest(), path
        assert record.size == len(before) and record.inode == path.stat().st_ino
        assert open_source(path).digest == record.sha256
        if tensors is not None:          # read whole: the same arrays as the reader's
            ref = read_tensors(path)
            assert list(tensors) == list(ref)
            for k in ref:
                a, b = _dense(tensors[k]), _dense(ref[k])
                assert a.dtype == b.dtype and a.flags.writeable
                np.testing.assert_array_equal(a, b)
        assert path.read_bytes() == before


def _dense(x) -> np.ndarray:
    if hasattr(x, "matrix"):                   # a Pattern (.smtx, .mtx)
        return x.matrix.toarray()
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


# == 3. stride-0, overlapping, sparse, meta and quantized tensors ========================
def test_a_stride_0_tensor_is_refused_before_it_is_materialised(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    # 8 GB once materialised, about 1 KB on disk.
    big = torch.ones(1, 1).expand(40000, 50000)
    torch.save({"big.weight": big, "fc.weight": torch.from_numpy(_layer())},
               tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_size < 10_000
    line = _refused(tmp_path, capsys, ["run", "m.pt", "-o", "out.npz", "-q"], 1, "m.pt",
                    "'big.weight'", "expanded or overlapping", "8000000000 bytes")
    assert "[0, 0]" in line
    with pytest.raises(FormatError, match=r"tensor 'big\.weight' is an expanded"):
        open_source(tmp_path / "m.pt")
    torch.save({"big.weight": big}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match=r"legacy\.pt: tensor 'big\.weight'"):
        read_tensors(tmp_path / "legacy.pt")


def test_an_overlapping_tensor_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(30000, dtype=torch.float32)
    over = base.as_strided((20000, 10000), (1, 1))   # rows overlap: 800 MB logical
    torch.save({"over.weight": over}, tmp_path / "o.pt")
    with pytest.raises(FormatError, match=r"'over\.weight' is an expanded or overlapping"):
        open_source(tmp_path / "o.pt")


def test_a_small_expanded_tensor_is_materialised_within_the_limit(tmp_path):
    torch = pytest.importorskip("torch")
    row = torch.arange(1, 49, dtype=torch.float32) * (torch.arange(48) % 3 == 0)
    state = {"fc.weight": torch.from_numpy(_layer()),
             "pos.weight": row.expand(32, 48),                 # 6 KB: read as usual
             "ids": torch.arange(5).expand(1, 5)}
    torch.save(state, tmp_path / "m.pt")
    run = regroup_file(tmp_path / "m.pt", **OPTS)
    assert [r["name"] for r in run.records] == ["fc.weight", "pos.weight"]


@pytest.mark.parametrize("kind", ["coo", "csr", "meta", "quantized"])
def test_tensors_without_dense_data_are_named(tmp_path, capsys, kind):
    torch = pytest.importorskip("torch")
    dense = torch.from_numpy(_layer())
    bad = {"coo": lambda: dense.to_sparse(), "csr": lambda: dense.to_sparse_csr(),
           "meta": lambda: torch.empty(32, 48, device="meta"),
           "quantized": lambda: torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8)}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # torch: sparse CSR is in beta
        torch.save({"fc.weight": dense, "bad.weight": bad()}, tmp_path / "m.pt")
    word = {"coo": "sparse", "csr": "sparse", "meta": "meta", "quantized": "quantized"}[kind]
    _refused(tmp_path, capsys, ["run", "m.pt", "-o", "out.npz", "-q"], 1, "m.pt",
             "'bad.weight'", word)
    _refused(tmp_path, capsys, ["inspect", "m.pt"], 1, "'bad.weight'", word)


def test_a_sparse_tensor_that_is_no_layer_is_left_alone(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"fc.weight": torch.from_numpy(_layer()),
             "buf": torch.ones(6).to_sparse()}                # 1-D: never a layer
    torch.save(state, tmp_path / "m.pt")
    run = regroup_file(tmp_path / "m.pt", **OPTS)
    assert [r["name"] for r in run.records] == ["fc.weight"]
    assert [n for n, _ in run.skipped] == ["buf"]


# == 4. indexing and loading are linear in the number of tensors =========================
def _many(path: Path, n: int, shape=(2, 2)) -> None:
    """A safetensors file of one 32x48 layer and ``n`` tiny fully dense tensors (each
    loaded, then skipped as not pruned), written directly (fast)."""
    header, blobs, off = {}, [], 0
    items = [("fc.weight", _layer())] + [(f"t{i}.weight", np.ones(shape, np.float32))
                                         for i in range(n)]
    for name, a in items:
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_a_task_carries_its_own_layer_only(tmp_path):
    _many(tmp_path / "small.safetensors", 10)
    _many(tmp_path / "large.safetensors", 20000)
    sizes = []
    for name in ("small", "large"):
        source = open_source(tmp_path / f"{name}.safetensors")
        ref = next(r for r in source.refs if r.name == "fc.weight")
        sizes.append(len(pickle.dumps(source.for_layer(ref))))
    assert sizes[1] < sizes[0] + 200, sizes    # not proportional to the tensor count


class _NoScan(dict):
    """A header index that fails when scanned whole (a lookup by name is fine)."""

    def __iter__(self):
        raise AssertionError("the whole index was scanned to read one layer")

    def items(self):
        raise AssertionError("the whole index was scanned to read one layer")

    keys = values = items


def test_reading_one_layer_looks_its_tensors_up_by_name(tmp_path):
    _many(tmp_path / "m.safetensors", 1000)
    index = open_source(tmp_path / "m.safetensors")._index[str(tmp_path / "m.safetensors")]
    got = read_safetensors(tmp_path / "m.safetensors", ["t7.weight", "fc.weight", "nope"],
                           index=_NoScan(index), digest=hashlib.sha256())
    assert list(got) == ["fc.weight", "t7.weight"]        # file order


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_members_are_read_on_their_own_as_np_load_reads_them(tmp_path, save):
    t = {"w": _layer(), "f": np.asfortranarray(_layer(1)), "b": _layer(2) != 0,
         "e": np.zeros((0, 3)), "s": np.float32(2.5)}
    save(tmp_path / "m.npz", **t)
    members = index_file(tmp_path / "m.npz").members
    got = read_npz_members(tmp_path / "m.npz", _NoScan(members), ["s", "w", "f", "b", "e"])
    with np.load(tmp_path / "m.npz") as z:
        for k in t:
            assert got[k].dtype == z[k].dtype and got[k].shape == z[k].shape
            np.testing.assert_array_equal(got[k], z[k])
    assert got["f"].flags.f_contiguous and got["w"].flags.writeable


def test_a_damaged_npz_member_is_a_format_error(tmp_path):
    np.savez(tmp_path / "m.npz", w=_layer())
    members = index_file(tmp_path / "m.npz").members
    raw = bytearray((tmp_path / "m.npz").read_bytes())
    raw[members["w"].offset + 200] ^= 0xFF                 # inside the array's bytes
    (tmp_path / "m.npz").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"m\.npz:w\.npy: damaged zip member"):
        read_npz_members(tmp_path / "m.npz", members, ["w"])


def test_loading_every_npz_layer_is_linear_in_the_member_count(tmp_path):
    n = 3000
    np.savez(tmp_path / "m.npz", **{f"t{i}.weight": np.ones((2, 2), np.float32)
                                    for i in range(n)}, **{"fc.weight": _layer()})
    t0 = time.perf_counter()
    source = open_source(tmp_path / "m.npz")
    for ref in source.refs:
        part = source.for_layer(ref)
        assert len(part._index[str(tmp_path / "m.npz")]) == 1
        weight, _, _ = part.load(ref)
    # About 1 s; reading the archive's directory for every layer took 10x longer.
    assert time.perf_counter() - t0 < 8


def test_a_torch_checkpoint_is_parsed_once_not_once_per_layer(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import regroup.source as source_mod
    state = {f"t{i}.weight": torch.ones(2, 2) for i in range(300)}
    state["fc.weight"] = torch.from_numpy(_layer())
    torch.save(state, tmp_path / "m.pt")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    source = open_source(tmp_path / "m.pt")
    for ref in source.refs:
        weight, _, digest = source.for_layer(ref).load(ref)
        assert tuple(weight.shape) == tuple(state[ref.weight].shape)
    assert len(calls) == 2            # indexing, then the first load; not 301 times
    source.verify()
    assert not source_mod._MAPPED     # released when the run is over
    run = regroup_file(tmp_path / "m.pt", **OPTS)
    assert [r["name"] for r in run.records] == ["fc.weight"]


def test_loading_every_layer_is_linear_in_the_tensor_count(tmp_path):
    n = 10000
    _many(tmp_path / "m.safetensors", n)
    t0 = time.perf_counter()
    source = open_source(tmp_path / "m.safetensors")
    for ref in source.refs:
        weight, _, _ = source.for_layer(ref).load(ref)
        assert weight.shape == ((32, 48) if ref.name == "fc.weight" else (2, 2))
    # About 2 s on a slow shared core; the former per-layer index scan took 3x longer
    # here, and hours at 500k tensors.
    assert len(source.refs) == n + 1 and time.perf_counter() - t0 < 8


def test_many_skipped_tensors_write_no_parts(tmp_path):
    _many(tmp_path / "m.safetensors", 3000)
    out = tmp_path / "out.npz"
    seen = []

    def progress(name, done, total, info):
        seen.append(len([p for p in (tmp_path / "out.npz.parts").glob("*.npz")]))

    run = regroup_checkpoint(tmp_path / "m.safetensors", out, block=2, method="sort",
                             progress=progress)
    assert [r["name"] for r in run.records] == ["fc.weight"]
    assert len(run.skipped) == 3000 and max(seen) <= 1
    assert not (tmp_path / "out.npz.parts").exists()


def test_read_safetensors_reads_the_names_asked_in_file_order(tmp_path):
    t = {"b": np.ones(3, np.float32), "a": np.zeros(2, np.float32), "c": np.arange(4.0)}
    write_safetensors(t, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors", ["c", "a", "missing", "a"])
    assert list(got) == ["a", "c"]
    np.testing.assert_array_equal(got["c"], t["c"])


# == 5. a shard index must agree with its shards ===========================================
def test_an_index_mapping_every_tensor_to_one_shard_is_refused(tmp_path, capsys):
    tensors = _tensors()
    true_map = _sharded(tmp_path / "ck", tensors)
    first = sorted(set(true_map.values()))[0]
    _sharded(tmp_path / "ck", tensors, weight_map=dict.fromkeys(tensors, first))
    missing = sorted(k for k, v in true_map.items() if v != first)
    line = _refused(tmp_path, capsys, ["run", "ck", "-o", "out.npz", "-q"], 1, "ck",
                    first)
    assert any(f"'{k}'" in line for k in missing), line
    with pytest.raises(FormatError, match="index"):
        open_source(tmp_path / "ck" / INDEX_NAME)


def test_an_index_naming_a_tensor_no_shard_has_is_refused(tmp_path, capsys):
    tensors = _tensors()
    true_map = _sharded(tmp_path / "ck", tensors)
    shard = sorted(set(true_map.values()))[0]
    _sharded(tmp_path / "ck", tensors, weight_map={**true_map, "ghost.weight": shard})
    _refused(tmp_path, capsys, ["run", "ck", "-o", "out.npz", "-q"], 1,
             "'ghost.weight'", shard, "does not hold it")


def test_an_index_leaving_a_shard_unused_is_refused(tmp_path, capsys):
    tensors = _tensors()
    true_map = _sharded(tmp_path / "ck", tensors)
    first, second = sorted(set(true_map.values()))
    _sharded(tmp_path / "ck", tensors,
             weight_map={k: v for k, v in true_map.items() if v == first})
    _refused(tmp_path, capsys, ["run", "ck", "-o", "out.npz", "-q"], 1, second,
             "not named by the index")


def test_other_safetensors_beside_an_index_are_not_its_shards(tmp_path):
    """Hugging Face folders also hold files that are not the index's shards (Mistral's
    consolidated.safetensors, an adapter): they are left alone, not an error."""
    tensors = _tensors()
    _sharded(tmp_path / "ck", tensors)
    write_safetensors({"other.weight": tensors[sorted(tensors)[0]]},
                      tmp_path / "ck" / "consolidated.safetensors")
    write_safetensors({"x.weight": tensors[sorted(tensors)[0]]},
                      tmp_path / "ck" / "adapter-00001-of-00001.safetensors")
    got = regroup_file(tmp_path / "ck", **OPTS)
    assert sorted(r["name"] for r in got.records) == sorted(tensors)


def test_an_index_missing_a_shard_of_its_series_is_refused(tmp_path):
    tensors = _tensors()
    true_map = _sharded(tmp_path / "ck", tensors, n_shards=3)
    first, second, third = sorted(set(true_map.values()))
    (tmp_path / "ck" / third).unlink()
    doc = {"metadata": {}, "weight_map": {k: v for k, v in true_map.items() if v != third}}
    (tmp_path / "ck" / INDEX_NAME).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=f"names no tensor in shard.*{third}"):
        open_source(tmp_path / "ck")


def test_an_index_putting_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    tensors = _tensors()
    true_map = _sharded(tmp_path / "ck", tensors)
    first, second = sorted(set(true_map.values()))
    k = next(k for k, v in true_map.items() if v == first)
    _sharded(tmp_path / "ck", tensors, weight_map={**true_map, k: second})
    with pytest.raises(FormatError, match=f"'{k}'.*{second}|{second}.*'{k}'"):
        open_source(tmp_path / "ck")


@pytest.mark.parametrize("weight_map", [["a"], {"a": 3}, {"a": None}, "x", 7])
def test_an_index_of_the_wrong_shape_is_a_format_error(tmp_path, weight_map):
    _sharded(tmp_path / "ck", _tensors(), weight_map=weight_map)
    with pytest.raises(FormatError, match=INDEX_NAME.replace(".", r"\.")):
        open_source(tmp_path / "ck")


def test_a_consistent_sharded_checkpoint_still_runs(tmp_path):
    tensors = _tensors()
    _sharded(tmp_path / "ck", tensors)
    write_safetensors(tensors, tmp_path / "one.safetensors")
    a = regroup_file(tmp_path / "ck", **OPTS)
    b = regroup_file(tmp_path / "one.safetensors", **OPTS)
    assert sorted(r["name"] for r in a.records) == sorted(r["name"] for r in b.records) \
        == sorted(tensors)


# == 6. deep nesting and overflowing numbers ================================================
def test_a_deeply_nested_index_is_a_format_error(tmp_path, capsys):
    ck = tmp_path / "ck"
    _sharded(ck, _tensors())
    (ck / INDEX_NAME).write_text('{"weight_map": ' + "[" * 200000 + "]" * 200000 + "}")
    _refused(tmp_path, capsys, ["run", "ck", "-o", "out.npz", "-q"], 1, INDEX_NAME,
             "nested too deeply")


def test_deeply_nested_safetensors_metadata_is_a_format_error(tmp_path, capsys):
    header = b'{"__metadata__": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _refused(tmp_path, capsys, ["run", "m.safetensors", "-o", "out.npz", "-q"], 1,
             "m.safetensors", "nested too deeply")


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1e400]},
    {"dtype": "F32", "shape": [1e400, 2], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, True]},
    {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]},
])
def test_overflowing_header_numbers_are_format_errors(tmp_path, capsys, entry):
    raw = json.dumps({"x.weight": entry}).replace("Infinity", "1e400").encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    _refused(tmp_path, capsys, ["run", "m.safetensors", "-o", "out.npz", "-q"], 1,
             "m.safetensors", "'x.weight'")


@pytest.mark.parametrize("depth", [5000, "cycle"])
def test_deeply_nested_dict_pickles_are_format_errors(tmp_path, capsys, depth):
    torch = pytest.importorskip("torch")
    root: dict = {}
    if depth == "cycle":
        root["fc"] = {"weight": torch.from_numpy(_layer())}
        root["self"] = root
    else:
        node = root
        for _ in range(depth):
            node["a"] = {}
            node = node["a"]
        node["weight"] = torch.from_numpy(_layer())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * 5000 + 1000))     # torch.save itself recurses
    try:
        torch.save(root, tmp_path / "m.pt")
    finally:
        sys.setrecursionlimit(limit)
    _refused(tmp_path, capsys, ["run", "m.pt", "-o", "out.npz", "-q"], 1, "m.pt",
             "nested deeper than")


@pytest.mark.parametrize("option, value, name, accepted", [
    ("--time-limit", "inf", "--time-limit", "(0, 1e9]"),
    ("--time-limit", "1e400", "--time-limit", "(0, 1e9]"),
    ("--time-limit", "1e300", "--time-limit", "(0, 1e9]"),
    ("--anneal", "1e300", "--anneal", "(0, 1e6]"),
    ("--budget", "blocks=1e400", "--budget", "[1, 2**53]"),
    ("--budget", "blocks=1e300", "--budget", "[1, 2**53]"),
    ("--budget", "iso=1e400", "--budget", "(0, 2**31]"),
    ("--budget", "iso=1e300", "--budget", "(0, 2**31]"),
    ("--layer-min", "1e400", "--layer-min", "[0, 1]"),
    ("--dense-above", "1e400", "--dense-above", "(0, 1]"),
])
def test_overflowing_option_values_are_usage_errors(tmp_path, capsys, option, value, name,
                                                    accepted):
    np.save(tmp_path / "m.npy", _layer())
    _refused(tmp_path, capsys, ["run", "m.npy", "-o", "out.npz", "-q", option, value], 2,
             f"'{name}'", accepted)


def test_overflowing_sweep_budgets_are_usage_errors(tmp_path, capsys):
    np.save(tmp_path / "m.npy", _layer())
    _refused(tmp_path, capsys, ["sweep", "m.npy", "--no-speed", "-q", "--budgets",
                                "iso,blocks=1e400"], 2, "'--budgets' option of regroup sweep",
             "[1, 2**53]")


@pytest.mark.parametrize("field, value", [("time_limit", 10**400), ("anneal", 10**400),
                                          ("layer_min", 10**400), ("dense_above", 10**400),
                                          ("budget", "blocks=1e400")])
def test_the_api_refuses_overflowing_values_as_value_errors(field, value):
    with pytest.raises(ValueError, match=f"'{field}' parameter"):
        RegroupOptions(**{field: value})


# == 7. names are escaped for terminals and encoded for file names =========================
HOSTILE = ["\x1b[31mred\x1b[0m.weight", "a\x00b.weight", "bell\x07\r\n.weight",
           "rtl\u202eexe.weight"]


def _hostile_file(path: Path) -> None:
    write_safetensors({n: _layer(i) for i, n in enumerate(HOSTILE)}
                      | {"dense.weight": np.ones((8, 8), np.float32)}, path)


@pytest.mark.parametrize("argv", [
    ["inspect", "h.safetensors"],
    ["run", "h.safetensors", "-o", "out.npz", "--block", "8", "--method", "sort"],
    ["run", "h.safetensors", "-o", "out2.npz", "--layers", "nomatch"],
    ["inspect", "out.npz"],
])
def test_control_characters_in_names_are_never_printed_raw(tmp_path, capsys, argv):
    _hostile_file(tmp_path / "h.safetensors")
    if argv[1] == "out.npz":
        regroup_checkpoint(tmp_path / "h.safetensors", tmp_path / "out.npz", **OPTS)
    code, out, err = _cli(tmp_path, capsys, argv)
    assert code == (1 if "nomatch" in argv else 0), err
    text = out + err
    for bad in ("\x1b", "\x00", "\x07", "\r", "\u202e"):
        assert bad not in text, (bad, text)
    assert "\\x1b[31mred\\x1b[0m.weight" in text
    assert "a\\x00b.weight" in text and "\\u202e" in text


def test_hgr_files_of_hostile_names_are_all_written(tmp_path, capsys):
    _hostile_file(tmp_path / "h.safetensors")
    code, out, err = _cli(tmp_path, capsys, ["inspect", "h.safetensors", "--hgr", "g"])
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert files == sorted(safe_filename(n) + ".hgr" for n in HOSTILE)
    assert f"wrote {len(HOSTILE)} .hgr files" in out


def test_hgr_names_meeting_on_a_case_insensitive_system_write_nothing(tmp_path, capsys):
    write_safetensors({"Fc.weight": _layer(0), "fc.weight": _layer(1)},
                      tmp_path / "c.safetensors")
    _refused(tmp_path, capsys, ["inspect", "c.safetensors", "--hgr", "g"], 1,
             "'Fc.weight'", "'fc.weight'", "case-insensitive")
    assert not (tmp_path / "g").exists()


def test_safe_filenames_are_distinct_and_plain():
    names = ["a/b", "a_b", "a%2Fb", "a\\b", ".", "..", "", "%", "a\x00b", "é", "e\u0301",
             "x" * 300, "x" * 299 + "y", "x" * 183 + "~" + "0" * 16, "CON", "a b", "-rf"]
    files = [safe_filename(n) for n in names]
    assert len(set(files)) == len(names)
    for f in files:
        assert f not in (".", "..") and "/" not in f and "\\" not in f and "\0" not in f
        assert 0 < len(f.encode()) <= 200 and f.isascii() and f.isprintable()
    assert safe_filename("encoder.layer.0.attention.self.query.weight") == \
        "encoder.layer.0.attention.self.query.weight"


def test_printable_escapes_only_what_a_terminal_would_obey():
    assert printable("fc1.weight") == "fc1.weight"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("x\u202ey\n") == "x\\u202ey\\x0a"
    assert printable("ünïcode name") == "ünïcode name"


# == two names for one layer =================================================================
def test_an_ao_pruning_state_dict_is_one_layer_with_its_mask(tmp_path):
    """torch.ao.pruning saves ``X.parametrizations.weight.original`` and its mask as
    ``X.parametrizations.weight.0.mask``: one layer ``X.weight`` with that mask, not a
    second layer made of the mask."""
    w = _layer(0)
    mask = (w != 0) & (np.random.default_rng(5).random(w.shape) < 0.5)   # not w's nonzeros
    write_safetensors({"fc.parametrizations.weight.original": w,
                       "fc.parametrizations.weight.0.mask": mask.astype(np.float32),
                       "fc.bias": np.ones(w.shape[0], np.float32)}, tmp_path / "ao.safetensors")
    got = regroup_file(tmp_path / "ao.safetensors", **OPTS)
    assert [r["name"] for r in got.records] == ["fc.weight"]
    assert got.records[0]["metrics"]["nnz"] == int(mask.sum()) < int(np.count_nonzero(w))


@pytest.mark.parametrize("keys", [("fc.weight", "fc.parametrizations.weight.original"),
                                  ("fc.weight_orig", "fc.parametrizations.weight.original"),
                                  ("fc.weight", "fc.parametrizations.weight.original",
                                   "fc.parametrizations.weight.0.mask")])
def test_two_tensors_that_are_one_layer_are_refused(tmp_path, capsys, keys):
    w = _layer(1)
    tensors = {k: (w != 0).astype(np.float32) if k.endswith("mask") else w for k in keys}
    if "fc.weight_orig" in tensors:
        tensors["fc.weight_mask"] = (w != 0).astype(np.float32)
    write_safetensors(tensors, tmp_path / "two.safetensors")
    line = _refused(tmp_path, capsys, ["run", "two.safetensors", "-o", "out.npz", "-q"], 1,
                    "two.safetensors", "both layer 'fc.weight'",
                    "'fc.parametrizations.weight.original'")
    assert "'fc.weight" in line
