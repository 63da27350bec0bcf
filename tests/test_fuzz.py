"""Hostile and broken inputs through every loader and the CLI (hypothesis).

Every case must end in a valid result or the documented error (FormatError /
RegroupError from the loaders; exit code 1 and one line from the CLI), never another
exception, a hang, a huge allocation, code execution, or a partial result file.

CI runs REGROUP_FUZZ_EXAMPLES (default 40) examples per test; the stress run
(``python benchmarks/stress.py``, figures in benchmarks/README.md) runs 1,000 per test
together with tests/test_hostile.py's generators.
"""
import json
import os
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regroup import FormatError, RegroupError, read_patterns
from regroup.source import open_source
from regroup.io import write_safetensors, write_smtx

from .conftest import log_case

# torch warns about the protocol of every hand-made pickle; the refusal is what matters.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
N = int(os.environ.get("REGROUP_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=N, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# No case may allocate more than this (a hostile header must not size an allocation).
MAX_BYTES = 256 * 2**20


# Nor take longer than this (the same bound as tests/test_hostile.py's cases).
MAX_SECONDS = 30.0


def _load_all(path):
    """Every loader on ``path``: a documented error or a valid result, bounded memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        for load in (lambda: read_patterns(path), lambda: open_source(path)):
            try:
                load()
            except (FormatError, RegroupError, FileNotFoundError):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _bounded("load", path, time.perf_counter() - t0, peak)


def _bounded(step, path, seconds, peak):
    """Check (and log for the stress run) one step's seconds and traced peak (bytes, or
    None when not traced: the CLI step, whose bound is the process's peak RSS)."""
    log_case(suite="fuzz", step=step, file=path.name, seconds=seconds,
             peak_mb=None if peak is None else peak / 2**20)
    assert peak is None or peak < MAX_BYTES, f"{path.name}: {peak / 2**20:.0f} MB allocated"
    assert seconds < MAX_SECONDS, f"{path.name}: {seconds:.0f} s"


def _cli(path, tmp_path):
    import tempfile
    from pathlib import Path

    from regroup.cli import main
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out.npz"   # tmp_path is shared by examples
    t0 = time.perf_counter()
    code = main(["run", str(path), "-o", str(out), "--block", "4", "--method", "sort", "-q"])
    _bounded("cli", path, time.perf_counter() - t0, None)
    assert code in (0, 1)
    assert out.exists() == (code == 0)          # never a partial result file
    return code


# -- safetensors: arbitrary header entries --------------------------------------------------
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "BOOL", "U8", "C64", "",
                              "STR"]),
    "shape": st.lists(st.one_of(st.integers(-2, 40), st.integers(2**31, 2**62)),
                      max_size=5),
    "data_offsets": st.lists(st.one_of(st.integers(-10, 5000), st.integers(2**40, 2**62)),
                             min_size=0, max_size=3),
})


@FUZZ
@given(entries=st.dictionaries(st.text(min_size=1, max_size=12), _entry, max_size=4),
       payload=st.integers(0, 4096), junk=st.booleans())
def test_safetensors_headers(tmp_path, entries, payload, junk):
    raw = json.dumps(entries).encode()
    if junk:
        raw = raw[: len(raw) // 2]
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(payload))
    _load_all(p)
    _cli(p, tmp_path)


# -- .smtx / .npy / .mtx headers that declare huge or inconsistent sizes ---------------------
@FUZZ
@given(rows=st.one_of(st.integers(-3, 50), st.integers(10**9, 10**15)),
       cols=st.one_of(st.integers(-3, 50), st.integers(10**9, 10**15)),
       nnz=st.one_of(st.integers(-3, 60), st.integers(10**9, 10**15)),
       offsets=st.lists(st.integers(-5, 80), max_size=12),
       indices=st.lists(st.integers(-5, 80), max_size=60),
       kind=st.sampled_from(["smtx", "mtx", "npy"]))
def test_declared_sizes(tmp_path, rows, cols, nnz, offsets, indices, kind):
    if kind == "smtx":
        p = tmp_path / "x.smtx"
        p.write_text(f"{rows}, {cols}, {nnz}\n{' '.join(map(str, offsets))}\n"
                     f"{' '.join(map(str, indices))}\n")
    elif kind == "mtx":
        p = tmp_path / "x.mtx"
        lines = [f"{r % 7 + 1} {c % 5 + 1} 1.5" for r, c in zip(offsets, indices)]
        p.write_text("%%MatrixMarket matrix coordinate real general\n"
                     f"{rows} {cols} {nnz}\n" + "\n".join(lines) + "\n")
    else:
        p = tmp_path / "x.npy"
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)}
        h = repr(header).encode()
        h += b" " * (-(len(h) + 11) % 64) + b"\n"
        p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + bytes(64))
    _load_all(p)
    _cli(p, tmp_path)


# -- values: NaN / inf, odd dtypes, zero-size and odd-rank tensors --------------------------
@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
       dtype=st.sampled_from(["f4", "f8", "f2", "i8", "u1", "?", "c8"]),
       special=st.sampled_from([None, np.nan, np.inf, -np.inf]),
       fmt=st.sampled_from(["npz", "safetensors", "pt"]), seed=st.integers(0, 99))
def test_tensor_values_and_shapes(tmp_path, shape, dtype, special, fmt, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * (rng.random(shape) < 0.4)).astype(dtype) \
        if dtype != "?" else rng.random(shape) < 0.4
    if special is not None and a.size and a.dtype.kind in "fc":
        a.flat[rng.integers(a.size)] = special
    p = tmp_path / f"t.{fmt}"
    if fmt == "npz":
        np.savez(p, layer=a)
    elif fmt == "safetensors":
        if a.dtype.kind == "c" or a.dtype == np.float16:
            a = a.real.astype(np.float32)
        write_safetensors({"layer": a}, p)
    else:
        torch = pytest.importorskip("torch")
        t = torch.from_numpy(np.asarray(a.real.astype(np.float32) if a.dtype.kind == "c"
                                        else a))
        torch.save({"layer.weight": t}, p)
    _load_all(p)
    _cli(p, tmp_path)


# -- pickles carrying code -------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))        # would create the marker file


@FUZZ
@given(suffix=st.sampled_from([".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz"]),
       wrap=st.sampled_from(["bare", "dict", "nested"]), protocol=st.integers(2, 5))
def test_pickles_carrying_code_are_refused_never_run(tmp_path, suffix, wrap, protocol):
    marker = tmp_path / "PWNED"
    obj = _Payload(str(marker))
    obj = {"bare": obj, "dict": {"w": obj}, "nested": {"state_dict": {"a": [obj]}}}[wrap]
    p = tmp_path / f"evil{suffix}"
    if suffix == ".npy":
        np.save(p, np.array([obj], dtype=object), allow_pickle=True)
    elif suffix == ".npz":
        np.savez(p, evil=np.array([obj], dtype=object))
    else:
        pytest.importorskip("torch")
        with open(p, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    with pytest.raises((FormatError, RegroupError)):
        read_patterns(p)
    assert _cli(p, tmp_path) == 1
    assert not marker.exists()


# -- byte damage to valid files of every format, and to sharded checkpoints ------------------
def _valid(tmp_path, suffix):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((20, 12)) * (rng.random((20, 12)) < 0.3)).astype(np.float32)
    p = tmp_path / f"v{suffix}"
    if suffix == ".smtx":
        write_smtx(sp.csr_matrix(w), p)
    elif suffix == ".npz":
        np.savez(p, fc=w)
    elif suffix == ".npy":
        np.save(p, w)
    elif suffix == ".safetensors":
        write_safetensors({"fc.weight": w, "fc.bias": w[0]}, p)
    elif suffix == ".mtx":
        import scipy.io
        scipy.io.mmwrite(p, sp.coo_matrix(w))
    elif suffix == ".pt":
        torch = pytest.importorskip("torch")
        torch.save({"fc.weight": torch.from_numpy(w)}, p)
    return p


@FUZZ
@given(suffix=st.sampled_from([".smtx", ".npz", ".npy", ".safetensors", ".mtx", ".pt"]),
       cut=st.integers(0, 10**6), truncate=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8))
def test_damaged_files(tmp_path, suffix, cut, truncate, flips):
    p = _valid(tmp_path, suffix)
    raw = bytearray(p.read_bytes())
    if truncate:
        raw = raw[: cut % (len(raw) + 1)]
    for pos, val in flips:
        if raw:
            raw[pos % len(raw)] = val
    p.write_bytes(bytes(raw))
    _load_all(p)
    _cli(p, tmp_path)


@FUZZ
@given(index=st.one_of(st.just(None), st.text(max_size=40),
                       st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=3),
                       st.fixed_dictionaries({"weight_map": st.dictionaries(
                           st.text(max_size=8), st.sampled_from(
                               ["a.safetensors", "../a.safetensors", "/etc/passwd", "b",
                                "a.safetensors\x00"]), max_size=3)})),
       damage=st.integers(0, 400))
def test_sharded_checkpoints(tmp_path, index, damage):
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(dir=tmp_path, prefix="ckpt"))   # tmp_path is shared
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 8)) * (rng.random((16, 8)) < 0.4)).astype(np.float32)
    write_safetensors({"fc.weight": w}, d / "a.safetensors")
    raw = bytearray((d / "a.safetensors").read_bytes())
    raw[damage % len(raw)] ^= 0xFF
    (d / "a.safetensors").write_bytes(bytes(raw))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(
            index if isinstance(index, str) else json.dumps(index))
    _load_all(d)
    _cli(d, tmp_path)
