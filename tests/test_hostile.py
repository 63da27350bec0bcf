"""Hostile cases of every class in issue 15, generated, each under resource limits.

Each class below is a generator: ``CLASSES[name](rng, kind, case_dir)`` builds one case of
``kind`` (files in ``case_dir``, the command, what must come out), its details drawn from
``rng``. CI runs every kind once (seed = the kind's index); the stress run draws many
cases per kind with fresh seeds::

    REGROUP_HOSTILE_CASES=1000 python -m pytest tests/test_hostile.py -m slow -q

Every case runs in a forked child of :mod:`tests.hostile_runner` (the CLI's ``main``, or a
model-side operation), killed at 30 s and allowed 1 GiB of address space beyond the
runner's; its peak RSS must stay under 1 GiB. One contract is checked for all:

- the exit status is the documented one (1: a file or layer problem, the one error line
  naming the file and, where one is at fault, the layer; 2: usage, naming the option; 0:
  a valid result), never an internal error or a traceback;
- nothing but the case's declared outputs appears or changes in its directory (no
  partial output, no parts or temporary files left, inputs untouched), and nothing at all
  when it fails; new outputs honour the umask;
- nothing printed holds a raw control character;
- where the case says so, the result is byte-identical to a clean run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from regroup import from_array, regroup_checkpoint, regroup_pattern
from regroup.io import write_safetensors, write_smtx
from regroup.result import save_result

from .conftest import EXAMPLE, log_case, snapshot, tcp_server
from .hostile_runner import Runner

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 30                 # per case, wall clock
RSS_MB = 1024                # per case: peak resident set, and address space beyond the runner
STRESS = int(os.environ.get("REGROUP_HOSTILE_CASES", "0"))
LAYER = "fc.weight"


# -- the case and its contract -------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One hostile case: the command and what the contract expects of it."""

    argv: list[str] | None                   # CLI arguments (relative to the case dir)
    exit: tuple[int, ...]                    # allowed exit statuses
    names: tuple[str, ...] = ()              # text the error line must contain
    outputs: tuple[str, ...] = ()            # files that may appear or change on success
    op: str = "cli"                          # or a model operation of the runner
    params: dict = dataclasses.field(default_factory=dict)
    umask: int = 0o022
    same_as: tuple[str, Path] | None = None  # (output, reference file): byte-identical
    hold: Callable[[], contextlib.AbstractContextManager] | None = None
    max_seconds: float = SECONDS             # a tighter bound where the refusal is up front
    check: Callable[[Path, Path], None] | None = None   # more checks (case dir, logs dir)
    env: dict[str, str] = dataclasses.field(default_factory=dict)   # for the child


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def check_contract(case: Case, got: dict, cwd: Path, logs: Path, before: dict) -> None:
    err = (logs / "stderr").read_text(errors="replace")
    out = (logs / "stdout").read_text(errors="replace")
    where = f"exit {got['exit']}, {got['seconds']:.1f} s, {got['maxrss_mb']:.0f} MB\n{err}"
    assert not got["timed_out"], f"killed after {SECONDS} s\n{where}"
    assert got["seconds"] < case.max_seconds, where
    assert got["maxrss_mb"] < RSS_MB, where
    assert got["exit"] in case.exit, where
    assert "Traceback" not in err and "internal error" not in err, where
    assert not _CONTROL.search(err) and not _CONTROL.search(out), where
    if got["exit"] in (1, 2):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines and "error:" in lines[-1], where
        if got["exit"] == 1:
            assert len(lines) == 1, where
        for name in case.names:
            assert name in lines[-1], f"{name!r} not named\n{where}"
    after = snapshot(cwd)
    if got["exit"] != 0:
        assert after == before, f"files changed by a failed case: {_diff(before, after)}"
    else:
        changed = _diff(before, after)
        unexpected = [c for c in changed if not _declared(c, case.outputs)]
        assert not unexpected, f"unexpected changes: {unexpected}"
        for name in changed:
            if name in after and after[name][0] == "file":
                assert after[name][2] == 0o666 & ~case.umask, (name, oct(after[name][2]))
    if case.same_as is not None:
        name, reference = case.same_as
        assert (cwd / name).read_bytes() == reference.read_bytes(), f"{name} differs"
    if case.check is not None:
        case.check(cwd, logs)


def _declared(name: str, outputs: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``outputs``; ``"dir/"`` declares everything under dir."""
    return any(name == o.rstrip("/") or (o.endswith("/") and name.startswith(o))
               for o in outputs)


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# -- inputs the cases start from -------------------------------------------------------------
def _weights(rng: np.random.Generator, n: int = 48, m: int = 64, density: float = 0.25):
    return (rng.standard_normal((n, m)) * (rng.random((n, m)) < density)).astype(np.float32)


def _write_input(rng: np.random.Generator, d: Path, stem: str = "in") -> str:
    """A small valid input in a format drawn from ``rng``; its file name."""
    w = _weights(rng)
    fmt = rng.choice(["npy", "npz", "smtx", "safetensors"])
    p = d / f"{stem}.{fmt}"
    if fmt == "npy":
        np.save(p, w)
    elif fmt == "npz":
        np.savez(p, **{LAYER: w, "other.weight": _weights(rng, 32, 48)})
    elif fmt == "smtx":
        write_smtx(sp.csr_matrix(w), p)
    else:
        write_safetensors({LAYER: w}, p)
    return p.name


_NAMES = ["r.npz", "out put.npz", "ünïcode.npz", "-dash.npz", "x" * 120 + ".npz"]


def _spell(rng: np.random.Generator, name: str) -> str:
    """``name`` as a user might spell it: plain, ./name, sub/../name, or absolute."""
    how = rng.integers(4)
    return [name, f"./{name}", f"sub/../{name}", None][how] or name


# -- 1. data loss through output paths --------------------------------------------------------
def gen_output_paths(rng, kind, d):
    src = _write_input(rng, d)
    (d / "sub").mkdir()
    base = ["run", src, "--block", "8", "--method", "sort", "-q"]
    target = {
        "o-is-input": lambda: src,
        "o-hard-link": lambda: os.link(d / src, d / "hard.npz") or "hard.npz",
        "o-symlink-to-input": lambda: os.symlink(src, d / "soft.npz") or "soft.npz",
        "o-dev-null": lambda: "/dev/null",
        "o-proc-fd": lambda: f"/proc/self/fd/{rng.integers(0, 3)}",
        "o-symlink-dev-null": lambda: os.symlink("/dev/null", d / "null.npz") or "null.npz",
        "o-dangling-symlink": lambda: os.symlink("gone.npz", d / "dang.npz") or "dang.npz",
        "o-fifo": lambda: os.mkfifo(d / "fifo.npz") or "fifo.npz",
        "o-directory": lambda: rng.choice([".", "sub", "sub/", "/", "new/"]),
        "o-missing-dir": lambda: f"nodir{rng.integers(99)}/r.npz",
        "o-through-a-file": lambda: f"{src}/r.npz",
        "o-existing-non-result": lambda: _existing(d / "notes.npz", rng),
    }
    if kind in target:
        o = str(target[kind]())
        return Case(base + [f"--output={_spell(rng, o) if '/' not in o else o}"], (1,), (o,))
    out = str(rng.choice(_NAMES))
    if kind == "report-is-input":
        return Case(base + [f"--output={out}", "--report", src], (1,), (f"'{src}'",))
    if kind == "report-is-o":
        spelled = _spell(rng, out)
        return Case(base + [f"--output={out}", f"--report={spelled}"], (1,), (spelled,))
    if kind == "report-missing-dir":
        return Case(base + [f"--output={out}", "--report", "nodir/r.json"], (1,), ("nodir",))
    if kind == "show-o-is-input":
        return Case(["show", src, "--block", "8", "-o", src], (1,), (f"'{src}'",))
    if kind == "compare-csv-is-input":
        return Case(["compare", src, "--methods", "sort", "--block", "8", "--csv", src],
                    (1,), (f"'{src}'",))
    if kind == "sweep-csv-is-md":
        return Case(["sweep", src, "--block", "8", "--no-speed", "-q", "--csv", "s.txt",
                     "--md", "s.txt"], (1,), ("'s.txt'",))
    if kind == "valid-report":          # the control: a clean run writes both outputs
        return Case(base + [f"--output={out}", "--report", "rep.json"], (0,),
                    outputs=(out, "rep.json"))
    raise AssertionError(kind)


def _existing(path: Path, rng) -> str:
    """A file that is not a regroup result (random bytes, maybe none); its name."""
    path.write_bytes(rng.bytes(int(rng.integers(0, 200))))
    return path.name


# -- 2. OUT.parts: tampered, foreign, locked ---------------------------------------------------
def _interrupted(d: Path, src: str, out: str, after: int) -> Path:
    """Stop a run of ``src`` after ``after`` layers: a parts directory to resume from."""
    seen = []

    def stop(name, done, total, info):
        seen.append(name)
        if len(seen) > after:
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        regroup_checkpoint(d / src, d / out, block=8, method="sort", progress=stop)
    return d / (out + ".parts")


def _rewrite_zip(path: Path, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    entries = change(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tamper_entries(rng, kind: str) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    def edit_meta(entries, fn):
        doc = json.loads(entries["meta.json"])
        fn(doc)
        return {**entries, "meta.json": json.dumps(doc).encode()}

    def first(entries, suffix):
        return next(k for k in entries if k.endswith(suffix))

    def array(entries, suffix, fn):
        key = first(entries, suffix)
        return {**entries, key: _npy(fn(np.load(io.BytesIO(entries[key]))))}

    return {
        "all-true-mask": lambda e: array(e, "mask.npy", lambda a: np.ones_like(a)),
        "small-mask": lambda e: array(e, "mask.npy", lambda a: np.ones((3, 3), a.dtype)),
        "row-perm-zeros": lambda e: array(e, "row_perm.npy", lambda a: np.zeros_like(a)),
        "missing-mask": lambda e: {k: v for k, v in e.items() if not k.endswith("mask.npy")},
        "status": lambda e: edit_meta(e, lambda doc: [lm.update(
            status=str(rng.choice(["skipped", "unknown", ""]))) for lm in doc["layers"]]),
        "renamed-layer": lambda e: edit_meta(e, lambda doc: [lm.update(name="evil.weight")
                                                              for lm in doc["layers"]]),
        "dotdot-entry": lambda e: {**e, "../escaped.txt": b"x", "layers/../../e": b"y"},
        "flipped-mask-bit": lambda e: array(
            e, "mask.npy", lambda a: np.where(np.arange(a.size).reshape(a.shape)
                                              == rng.integers(a.size), ~a, a)),
    }[kind]


def gen_parts(rng, kind, d):
    w = {f"l{i}.weight": _weights(rng, int(rng.choice([32, 48])), int(rng.choice([40, 64])))
         for i in range(3)}
    np.savez(d / "ckpt.npz", **w)
    ref_dir = d.parent / (d.name + "-reference")
    ref_dir.mkdir()
    regroup_checkpoint(d / "ckpt.npz", ref_dir / "r.npz", block=8, method="sort")
    argv = ["run", "ckpt.npz", "-o", "r.npz", "--block", "8", "--method", "sort", "-q"]
    if kind == "foreign-dir":
        (d / "r.npz.parts").mkdir()
        (d / "r.npz.parts" / "notes.txt").write_text("mine")
        return Case(argv, (1,), ("r.npz.parts",))
    if kind == "parts-symlink":
        (d / "elsewhere").mkdir()
        os.symlink("elsewhere", d / "r.npz.parts")
        return Case(argv, (1,), ("r.npz.parts",))
    if kind == "parts-is-a-file":
        (d / "r.npz.parts").write_bytes(rng.bytes(16))
        return Case(argv, (1,), ("r.npz.parts",))
    if kind == "held-lock":
        from regroup._outputs import PartsDir

        @contextlib.contextmanager
        def hold():
            held = PartsDir.claim(str(d / "r.npz"))
            try:
                yield
            finally:
                held.keep()
        return Case(argv, (1,), ("r.npz.parts", "another regroup run"), hold=hold,
                    max_seconds=10)
    parts = _interrupted(d, "ckpt.npz", "r.npz", int(rng.integers(1, 3)))
    files = sorted(parts.glob("*.npz"))
    assert files, "the interrupted run kept no part"
    victim = files[int(rng.integers(len(files)))]
    if kind == "random-bytes":
        raw = bytearray(victim.read_bytes())
        for _ in range(int(rng.integers(1, 6))):
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
        victim.write_bytes(bytes(raw))
    elif kind == "truncated":
        raw = victim.read_bytes()
        victim.write_bytes(raw[: int(rng.integers(len(raw)))])
    else:
        _rewrite_zip(victim, _tamper_entries(rng, kind))
    return Case(argv, (0,), outputs=("r.npz", "r.npz.parts/"), same_as=("r.npz", ref_dir / "r.npz"),
                check=lambda cwd, logs: _assert_gone(cwd / "r.npz.parts"))


def _assert_gone(p: Path) -> None:
    assert not p.exists() and not p.is_symlink(), f"{p.name} left behind"


# -- 3. hostile result files -----------------------------------------------------------------
def _valid_result(rng, d: Path, fmt: str) -> tuple[Path, np.ndarray]:
    w = _weights(rng, 64, 96, 0.2)
    r = regroup_pattern(from_array(w, name=LAYER), block=8, format=fmt, method="sort")
    path = d / "res.npz"
    save_result(path, [r], {"options": {"seed": 0}, "versions": {"regroup": "test"}})
    return path, w


def _patch_sizes(path: Path, entry: str, size: int) -> None:
    """Declare ``size`` as ``entry``'s uncompressed size in both zip headers (a lie)."""
    raw = bytearray(path.read_bytes())
    name = entry.encode()
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            nlen_at = 26 if sig == b"PK\x03\x04" else 28
            nlen = struct.unpack_from("<H", raw, i + nlen_at)[0]
            head = 30 if sig == b"PK\x03\x04" else 46
            if raw[i + head:i + head + nlen] == name:
                struct.pack_into("<I", raw, i + off, size & 0xFFFFFFFF)
            start = i + 4
    path.write_bytes(bytes(raw))


def _zeros_npy(shape: tuple[int, ...], dtype: str = "|b1") -> bytes:
    """The npy header of a ``shape`` array (the payload is written by :func:`_bomb`)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _bomb(path: Path, entry: str, shape: tuple[int, int]) -> None:
    """Replace ``entry`` by a deflate bomb: an npy of ``shape`` zeros (~1000x compression)."""
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            if name != entry:
                zf.writestr(name, data)
                continue
            with zf.open(name, "w", force_zip64=True) as f:
                f.write(_zeros_npy(shape))
                chunk = bytes(1 << 24)
                for left in range(shape[0] * shape[1], 0, -len(chunk)):
                    f.write(chunk[:min(left, len(chunk))])
    tmp.replace(path)


def gen_result_files(rng, kind, d):
    fmt = str(rng.choice(["grid", "shuffled"]))
    path, w = _valid_result(rng, d, fmt)
    layer = (f"layer '{LAYER}'",)
    if kind == "meta-json":
        bad = rng.choice(["deep", "type", "number", "missing", "junk"])
        doc = json.loads(zipfile.ZipFile(path).read("meta.json"))
        if bad == "deep":
            depth = int(rng.integers(200, 20000))
            text = "[" * depth + "]" * depth
        elif bad == "type":
            key = str(rng.choice(["shape", "block_shape", "format", "entry", "name", "seed"]))
            doc["layers"][0][key] = [None, {}, "x", -1, 1e308, [1, 2, 3]][rng.integers(6)]
            text = json.dumps(doc)
        elif bad == "number":
            text = json.dumps(doc).replace('"seed": 0', f'"seed": 1{"0" * 400}', 1)
            text = text.replace("[64, 96]", f"[64, 9{'9' * int(rng.integers(20, 400))}]")
        elif bad == "missing":
            del doc["layers"][0][str(rng.choice(["shape", "entry", "format", "name"]))]
            text = json.dumps(doc)
        else:
            text = rng.bytes(int(rng.integers(1, 300))).decode("latin-1")
        _rewrite_zip(path, lambda e: {**e, "meta.json": text.encode("utf-8", "surrogatepass")})
        names = (path.name,)
    elif kind == "declared-size-lie":
        entry = str(rng.choice(["meta.json", "layers/0/mask.npy", "layers/0/row_perm.npy"]))
        _patch_sizes(path, entry, int(rng.integers(2**28, 2**32)))
        names = (path.name,)
    elif kind == "mask-bomb":
        side = int(rng.integers(2**14, 2**15 + 2**14))       # 0.27-2.4 GB of mask
        _bomb(path, "layers/0/mask.npy", (side, side))
        names = (path.name,)
    elif kind in ("perm-range", "perm-duplicate", "perm-length", "perm-dtype"):
        entry = str(rng.choice(["row_perm.npy", "col_perm.npy" if fmt == "grid"
                                else "panel_cols.npy"]))

        def bad_perm(a):
            a = a.copy()
            if kind == "perm-range":
                a[rng.integers(a.size)] = rng.choice([-1, a.size, 2**40, -2**40])
            elif kind == "perm-duplicate":
                i, j = rng.choice(a.size, 2, replace=False)
                a[i] = a[j]
            elif kind == "perm-length":
                a = a[: int(rng.integers(0, a.size))]
            else:
                a = a.astype(rng.choice(["f8", "c16", "U3", "?"]))
            return a
        _rewrite_zip(path, lambda e: {**e, f"layers/0/{entry}": _npy(bad_perm(
            np.load(io.BytesIO(e[f"layers/0/{entry}"]))))})
        names = (path.name, *layer)
    elif kind == "mask-not-blocks":
        def flip(a):
            a = a.copy()
            idx = rng.integers(a.size, size=int(rng.integers(1, 4)))
            a.flat[idx] = ~a.flat[idx]
            return a
        _rewrite_zip(path, lambda e: {**e, "layers/0/mask.npy": _npy(flip(
            np.load(io.BytesIO(e["layers/0/mask.npy"]))))})
        names = (path.name, *layer)
    elif kind == "mask-shape-dtype":
        bad = [np.ones((3, 3), bool), np.ones((64 * 96,), np.int64),
               np.zeros((64, 96), [("a", "i1")]), np.ones((96, 64), bool)][rng.integers(4)]
        _rewrite_zip(path, lambda e: {**e, "layers/0/mask.npy": _npy(bad)})
        names = (path.name, *layer)
    elif kind == "many-layers":
        doc = json.loads(zipfile.ZipFile(path).read("meta.json"))
        doc["layers"] = doc["layers"] * int(rng.integers(20_000, 120_000))
        _rewrite_zip(path, lambda e: {**e, "meta.json": json.dumps(doc).encode()})
        names = (path.name,)
    elif kind == "odd-entries":
        extra = rng.choice(["../evil", "/abs", "layers/0/mask.npy"])
        if extra == "layers/0/mask.npy":
            with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning):
                zf.writestr(extra, b"duplicate")
        else:
            _rewrite_zip(path, lambda e: {**e, str(extra): b"x"})
        names = (path.name,)
    else:
        raise AssertionError(kind)
    np.savez(d / "w.npz", **{LAYER: w})
    command = rng.choice(["inspect", "show"])
    if command == "inspect":
        argv = ["inspect", path.name]
    else:
        argv = ["show", "w.npz", "--result", path.name, "-o", "o.png", "--block", "8"]
    return Case(argv, (1,), names)


# -- 4. inputs that hang, exhaust memory or confuse the readers --------------------------------
def _nested_pickle(depth: int) -> bytes:
    """A dict nested ``depth`` deep, built by the pickle opcodes (no recursion here)."""
    return b"\x80\x02" + b"}q\x00X\x01\x00\x00\x00a" * depth + b"K\x01" + b"s" * depth + b"."


def gen_inputs(rng, kind, d):
    torch = None
    if kind in ("stride-0", "overlapping", "nested-pickle", "no-dense-data"):
        torch = pytest.importorskip("torch")
    if kind == "fifo-input":
        name = f"in.{rng.choice(['npy', 'npz', 'safetensors', 'pt', 'smtx', 'mtx'])}"
        os.mkfifo(d / name)
        command = rng.choice(["run", "inspect"])
        argv = [command, name] + (["-o", "r.npz", "-q"] if command == "run" else [])
        return Case(argv, (1,), (name,), max_seconds=10)
    if kind in ("fifo-shard", "fifo-index"):
        ck = d / "ckpt"
        ck.mkdir()
        write_safetensors({LAYER: _weights(rng)}, ck / "model-00001-of-00002.safetensors")
        shard2 = ck / "model-00002-of-00002.safetensors"
        index = {"weight_map": {LAYER: "model-00001-of-00002.safetensors",
                                "fc2.weight": "model-00002-of-00002.safetensors"}}
        if kind == "fifo-shard":
            os.mkfifo(shard2)
            (ck / "model.safetensors.index.json").write_text(json.dumps(index))
            named = shard2.name
        else:
            write_safetensors({"fc2.weight": _weights(rng)}, shard2)
            os.mkfifo(ck / "model.safetensors.index.json")
            named = "model.safetensors.index.json"
        return Case(["run", "ckpt", "-o", "r.npz", "-q", "--block", "8"], (1,), (named,),
                    max_seconds=10)
    if kind == "socket-input":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "in.npz"))
        d.joinpath(".keep").write_text("")          # the socket lives as long as the test
        _CLEANUP.callback(s.close)
        return Case(["run", "in.npz", "-o", "r.npz", "-q"], (1,), ("in.npz",), max_seconds=10)
    if kind == "stride-0":
        rows, cols = int(rng.integers(10_000, 60_000)), int(rng.integers(10_000, 60_000))
        t = torch.randn(1, cols).expand(rows, cols)
        torch.save({LAYER: t}, d / "big.pt")
        return Case(["run", "big.pt", "-o", "r.npz", "-q"], (1,), ("big.pt",))
    if kind == "overlapping":
        rows = int(rng.integers(20_000, 40_000))
        base = torch.randn(rows + 4_000)             # every row a shifted window of it
        t = base.as_strided((rows, 4_000), (1, 1))
        torch.save({LAYER: t}, d / "ov.pt")
        return Case(["run", "ov.pt", "-o", "r.npz", "-q"], (1,), ("ov.pt",))
    if kind == "no-dense-data":
        w = torch.from_numpy(_weights(rng))
        t = [w.to_sparse(), w.to_sparse_csr(), torch.empty(48, 64, device="meta"),
             torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)][rng.integers(4)]
        torch.save({LAYER: t}, d / "odd.pt")
        return Case(["run", "odd.pt", "-o", "r.npz", "-q"], (1,), ("odd.pt", LAYER))
    if kind == "nested-pickle":
        (d / "deep.pt").write_bytes(_nested_pickle(int(rng.integers(2_000, 100_000))))
        return Case(["run", "deep.pt", "-o", "r.npz", "-q"], (1,), ("deep.pt",))
    if kind == "nested-index":
        ck = d / "ckpt"
        ck.mkdir()
        write_safetensors({LAYER: _weights(rng)}, ck / "a.safetensors")
        depth = int(rng.integers(200, 50_000))
        (ck / "model.safetensors.index.json").write_text(
            '{"weight_map": {"x": ' + "[" * depth + "]" * depth + "}}")
        return Case(["run", "ckpt", "-o", "r.npz", "-q"], (1,), ("model.safetensors.index.json",))
    if kind == "nested-metadata":
        w = _weights(rng).tobytes()
        depth = int(rng.integers(2, 50_000))
        header = ('{"__metadata__": {"a": ' + '{"b": ' * depth + "1" + "}" * depth + "}, "
                  f'"{LAYER}": {{"dtype": "F32", "shape": [48, 64], "data_offsets": '
                  f"[0, {len(w)}]}}}}").encode()
        (d / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + w)
        # Metadata must map strings to strings (the format's rule): refused at any depth.
        return Case(["run", "m.safetensors", "-o", "r.npz", "-q"], (1,), ("m.safetensors",))
    if kind == "declared-huge-npy":
        shape = tuple(int(x) for x in rng.integers(2**20, 2**40, size=int(rng.integers(1, 4))))
        header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
        header += b" " * (-(len(header) + 11) % 64) + b"\n"
        (d / "h.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header))
                                  + header + rng.bytes(256))
        return Case(["run", "h.npy", "-o", "r.npz", "-q"], (1,), ("h.npy",))
    if kind == "many-tiny-tensors":
        count = int(rng.integers(2_000, 8_000))
        tensors = {f"t{i}.bias": np.zeros(int(rng.integers(1, 4)), np.float32)
                   for i in range(count)}
        tensors[LAYER] = _weights(rng)
        write_safetensors(tensors, d / "many.safetensors")
        return Case(["run", "many.safetensors", "-o", "r.npz", "-q", "--block", "8"], (0,),
                    outputs=("r.npz",))
    if kind == "tall-or-thin":
        rows, cols = [(65536, 1), (40000, 2), (1, 65536), (2, 40000), (30000, 17),
                      (17, 30000)][rng.integers(6)]
        density = float(rng.uniform(0.05, 0.5))
        mat = sp.random(rows, cols, density=density, format="csr",
                        random_state=int(rng.integers(2**31)))
        write_smtx(mat, d / "tall.smtx")
        return Case(["run", "tall.smtx", "-o", "r.npz", "-q", "--block",
                     str(rng.choice([8, 16, 32]))], (0, 1), ("tall.smtx",), outputs=("r.npz",))
    if kind == "tiny-blocks":
        side = int(rng.integers(5_800, 12_000))      # side * side / 2 > 2**24
        block = str(rng.choice(["1", "1x2", "2x1"]))
        mat = sp.random(side, side, density=float(rng.uniform(1e-5, 1e-4)), format="csr",
                        random_state=int(rng.integers(2**31)))
        write_smtx(mat, d / "wide.smtx")
        return Case(["run", "wide.smtx", "-o", "r.npz", "-q", "--method", "sort", "--block",
                     block], (1,), ("wide.smtx", "MAX_TABLE_CELLS"), max_seconds=10)
    if kind in ("index-one-shard", "index-missing-tensor", "index-unused-shard",
                "index-escapes"):
        ck = d / "ckpt"
        ck.mkdir()
        a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        write_safetensors({LAYER: _weights(rng)}, ck / a)
        write_safetensors({"fc2.weight": _weights(rng)}, ck / b)
        wm = {LAYER: a, "fc2.weight": b}
        if kind == "index-one-shard":
            wm = {LAYER: a, "fc2.weight": a}
        elif kind == "index-missing-tensor":
            wm[f"ghost{rng.integers(99)}.weight"] = str(rng.choice([a, b]))
        elif kind == "index-unused-shard":
            del wm["fc2.weight"]
        else:
            # (indexed, not rng.choice: numpy strings drop a trailing NUL)
            wm["fc2.weight"] = ["../" + b, "/etc/passwd", b + "\x00"][rng.integers(3)]
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        return Case(["run", "ckpt", "-o", "r.npz", "-q", "--block", "8"], (1,), ("ckpt",))
    raise AssertionError(kind)


# What a case's generator opened for it (sockets, servers): closed when the case ends.
_CLEANUP = contextlib.ExitStack()


# -- 5. option values --------------------------------------------------------------------------
_OPTIONS = {
    "--time-limit": ["inf", "nan", "-1", "1e400", "abc", "0"],
    "--anneal": ["inf", "-2", "1e400", "nan"],
    "--budget": ["blocks=1e300", "density=2", "retained=-1", "blocks=0", "density=nan",
                 "magic", "blocks=-5"],
    "--block": ["0", "-3", "1e9", "abc", "16x0", "99999999999999999999"],
    "--seed": ["-1", "1e400", str(2**70), "x"],
    "--jobs": ["0", "-1", "1e9", str(2**70)],
    "--dense-above": ["1.5", "-0.1", "nan", "inf"],
    "--layer-min": ["2", "-0.5", "nan"],
}


def gen_options(rng, kind, d):
    src = _write_input(rng, d)
    option = kind
    value = str(rng.choice(_OPTIONS[option]))
    extra = ["--budget-scope", "global"] if option == "--layer-min" else []
    argv = ["run", src, "-o", "r.npz", "-q", *extra, f"{option}={value}"]
    return Case(argv, (2,), (option,), max_seconds=10)


# -- 6. names a terminal or a file system would obey ------------------------------------------
_HOSTILE_NAMES = ["\x1b[31mred\x1b[0m.weight", "nul\x00byte.weight", "new\nline.weight",
                  "bell\x07.weight", "\u202eright-to-left.weight", "../../escape.weight",
                  "con.weight", "a/b/../c.weight", "\x9b31mcsi.weight"]


def gen_names(rng, kind, d):
    picked = rng.choice(len(_HOSTILE_NAMES), size=int(rng.integers(1, 4)), replace=False)
    tensors = {_HOSTILE_NAMES[i]: _weights(rng) for i in picked}
    if kind == "safetensors":
        write_safetensors(tensors, d / "n.safetensors")
        src = "n.safetensors"
    else:
        tensors = {k: v for k, v in tensors.items() if "\x00" not in k} or {"plain": _weights(rng)}
        np.savez(d / "n.npz", **tensors)
        src = "n.npz"
    if kind == "hgr":
        (d / "hgr").mkdir()
        return Case(["inspect", src, "--hgr", "hgr"], (0, 1), (src,),
                    outputs=("hgr/",), check=_all_or_nothing("hgr", len(tensors)))
    return Case(["run", src, "-o", "r.npz", "--block", "8", "--method", "sort"], (0,),
                outputs=("r.npz",))


def _all_or_nothing(folder: str, layers: int):
    def check(cwd: Path, logs: Path) -> None:
        written = list((cwd / folder).iterdir())
        assert len(written) in (0, layers), f"{len(written)} of {layers} .hgr files written"
    return check


# -- 7. code in the working directory ---------------------------------------------------------
def gen_code_execution(rng, kind, d):
    module = str(rng.choice(["json", "pickle", "numpy", "scipy", "regroup", "zipfile"]))
    (d / f"{module}.py").write_text("open('PWNED', 'a').write('ran')\n")
    src = _write_input(rng, d)
    options = {"jobs": ["--jobs", "2"], "time-limit": ["--method", "metis", "--time-limit", "20"],
               "dask": ["--engine", "dask", "--jobs", "1"]}[kind]
    if kind == "time-limit":
        pytest.importorskip("pymetis")
    if kind == "dask":
        pytest.importorskip("distributed")
    return Case(["run", src, "-o", "r.npz", "-q", "--block", "8", *options], (0,),
                outputs=("r.npz",))


# -- 8. dask schedulers that never answer, or answer garbage ----------------------------------
def gen_dask(rng, kind, d):
    pytest.importorskip("distributed")
    reply = None if kind == "silent" else rng.bytes(int(rng.integers(1, 64))) + b"\xff" * 64
    address = _CLEANUP.enter_context(tcp_server(reply))     # stops when the case ends
    src = _write_input(rng, d)
    # dask's connect timeout bounds the wait (30 s by default); the case sets it lower.
    timeout = int(rng.integers(2, 8))
    return Case(["run", src, "-o", "r.npz", "-q", "--engine", "dask", "--scheduler", address],
                (1,), (address.removeprefix("tcp://"),),
                env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": f"{timeout}s"},
                max_seconds=timeout + 10)


# -- 9. models ---------------------------------------------------------------------------------
def gen_models(rng, kind, d):
    pytest.importorskip("torch")
    depth = int(rng.integers(3, 6))
    width = int(rng.choice([32, 48, 64]))
    widths = [int(rng.choice([32, 40, 64]))] + [width] * (depth - 1) + [int(rng.choice([10, 24]))]
    params = {"twist": kind, "seed": int(rng.integers(2**31)), "widths": widths,
              "density": float(rng.uniform(0.1, 0.5)), "layer": int(rng.integers(99)),
              "block": int(rng.choice([8, 16]))}

    def findings(cwd: Path, logs: Path) -> None:
        got = json.loads((logs / "op.json").read_text())
        if kind in ("meta", "tampered-result"):
            assert "error" in got, got
        elif kind in ("weight-norm", "parametrization"):
            assert "error" not in got and got["skipped"], got
        else:
            assert "error" not in got and got["max_error"] <= 1e-5, got
    return Case(None, (0,), op="model", params=params, check=findings)


# -- 10. outputs: umask, default names, symlinked inputs ---------------------------------------
def gen_outputs(rng, kind, d):
    if kind == "umask":
        src = _write_input(rng, d)
        umask = int(rng.choice([0o077, 0o027, 0o002, 0o022, 0o007]))
        return Case(["run", src, "-o", "r.npz", "--report", "rep.json", "-q", "--block", "8"],
                    (0,), outputs=("r.npz", "rep.json"), umask=umask)
    if kind == "default-names":
        w = _weights(rng)
        np.save(d / "model.a.npy", w)
        np.savez(d / "model.b.npz", w=w)
        src = str(rng.choice(["model.a.npy", "model.b.npz"]))
        return Case(["run", src, "-q", "--block", "8"], (0,), outputs=(f"{src}.regroup.npz",))
    if kind == "symlinked-input":
        src = _write_input(rng, d, "real")
        os.symlink(src, d / f"link{Path(src).suffix}")
        ref = d.parent / (d.name + "-reference")
        ref.mkdir()
        regroup_checkpoint(d / f"link{Path(src).suffix}", ref / "r.npz", block=8,
                           method="sort")
        return Case(["run", f"link{Path(src).suffix}", "-o", "r.npz", "-q", "--block", "8",
                     "--method", "sort"], (0,), outputs=("r.npz",),
                    same_as=("r.npz", ref / "r.npz"))
    if kind == "example-rerun":
        (d / "ex.npz").write_bytes(EXAMPLE.read_bytes())
        ref = d.parent / (d.name + "-reference")
        ref.mkdir()
        regroup_checkpoint(d / "ex.npz", ref / "r.npz", block=16, method="sort")
        (d / "r.npz").write_bytes((ref / "r.npz").read_bytes())     # an older result
        return Case(["run", "ex.npz", "-o", "r.npz", "-q", "--block", "16", "--method",
                     "sort"], (0,), outputs=("r.npz",), same_as=("r.npz", ref / "r.npz"))
    raise AssertionError(kind)


# -- the table ---------------------------------------------------------------------------------
CLASSES: dict[str, tuple[Callable, list[str]]] = {
    "output-paths": (gen_output_paths, [
        "o-is-input", "o-hard-link", "o-symlink-to-input", "o-dev-null", "o-proc-fd",
        "o-symlink-dev-null", "o-dangling-symlink", "o-fifo", "o-directory", "o-missing-dir",
        "o-through-a-file", "o-existing-non-result", "report-is-input", "report-is-o",
        "report-missing-dir", "show-o-is-input", "compare-csv-is-input", "sweep-csv-is-md",
        "valid-report"]),
    "parts": (gen_parts, [
        "foreign-dir", "parts-symlink", "parts-is-a-file", "held-lock", "random-bytes",
        "truncated", "all-true-mask", "small-mask", "row-perm-zeros", "missing-mask",
        "status", "renamed-layer", "dotdot-entry", "flipped-mask-bit"]),
    "result-files": (gen_result_files, [
        "meta-json", "declared-size-lie", "mask-bomb", "perm-range", "perm-duplicate",
        "perm-length", "perm-dtype", "mask-not-blocks", "mask-shape-dtype", "many-layers",
        "odd-entries"]),
    "inputs": (gen_inputs, [
        "fifo-input", "fifo-shard", "fifo-index", "socket-input", "stride-0", "overlapping",
        "no-dense-data", "nested-pickle", "nested-index", "nested-metadata",
        "declared-huge-npy", "many-tiny-tensors", "tall-or-thin", "tiny-blocks",
        "index-one-shard",
        "index-missing-tensor", "index-unused-shard", "index-escapes"]),
    "options": (gen_options, list(_OPTIONS)),
    "names": (gen_names, ["safetensors", "npz", "hgr"]),
    "code-execution": (gen_code_execution, ["jobs", "time-limit", "dask"]),
    "dask": (gen_dask, ["silent", "garbage"]),
    "models": (gen_models, ["plain", "tied", "parametrization", "weight-norm", "meta",
                            "tampered-result"]),
    "outputs": (gen_outputs, ["umask", "default-names", "symlinked-input", "example-rerun"]),
}
KINDS = [(cls, kind) for cls, (_, kinds) in CLASSES.items() for kind in kinds]


def run_case(runner: Runner, tmp_path: Path, cls: str, kind: str, seed: int) -> None:
    gen = CLASSES[cls][0]
    rng = np.random.default_rng([seed, KINDS.index((cls, kind))])
    cwd, logs = tmp_path / "case", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    try:
        case = gen(rng, kind, cwd)
        if case.op == "model" and not runner.info["torch"]:
            pytest.skip("the model cases need torch")
        before = snapshot(cwd)
        with (case.hold or contextlib.nullcontext)():
            got = runner.run(cwd, logs, op=case.op, argv=case.argv, params=case.params,
                             seconds=SECONDS, rss_mb=RSS_MB, umask=case.umask, env=case.env)
        log_case(suite="hostile", cls=cls, kind=kind, seed=seed, exit=got["exit"],
                 seconds=got["seconds"], rss_mb=got["maxrss_mb"])
        check_contract(case, got, cwd, logs, before)
    finally:
        _CLEANUP.close()


def test_the_table_covers_enough_distinct_cases():
    assert len(KINDS) >= 60 and len(set(KINDS)) == len(KINDS)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("cls, kind", KINDS, ids=[f"{c}:{k}" for c, k in KINDS])
def test_hostile_case(hostile_runner, tmp_path, cls, kind):
    run_case(hostile_runner, tmp_path, cls, kind, seed=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("index", range(STRESS or 1))
def test_hostile_stress(hostile_runner, tmp_path, index):
    """REGROUP_HOSTILE_CASES cases, the kinds in turn, each with a fresh seed."""
    if not STRESS:
        pytest.skip("set REGROUP_HOSTILE_CASES (e.g. 1000) for the stress run")
    cls, kind = KINDS[index % len(KINDS)]
    run_case(hostile_runner, tmp_path, cls, kind, seed=1 + index // len(KINDS))
