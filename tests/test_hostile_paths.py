"""Hostile output paths, parts directories and working directories (issue 15).

Every refused case ends in exit code 1 with one line naming the path, before any work:
no input or unrelated file changes, and nothing is left behind (no result, no OUT.parts,
no temporary file).
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from regroup import RegroupError, regroup_checkpoint, regroup_file
from regroup._outputs import PARTS_MARKER, PartsDir, default_output
from regroup.cli import main

from .conftest import EXAMPLE, child_pids, kill_parent, process_alive, snapshot

ROOT = Path(__file__).resolve().parents[1]


def _masks(tmp_path: Path) -> None:
    """Tiny inputs: one mask as .npy, two as .npz, the example checkpoint."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "m.npy", rng.random((32, 48)) < 0.3)
    np.savez(tmp_path / "m.npz", a=rng.random((32, 48)) < 0.3, b=rng.random((48, 32)) < 0.3)
    (tmp_path / "ex.npz").write_bytes(EXAMPLE.read_bytes())


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _foreign_parts(p: Path) -> None:
    p.mkdir()
    (p / "notes.txt").write_text("mine")


RUN = ["run", "m.npy", "--block", "16", "-q"]
# (id, setup(tmp_path) or None, argv (relative to tmp_path), the text naming the path)
CASES = [
    ("o-is-npy-input", None, RUN + ["-o", "m.npy"], "'m.npy'"),
    ("o-is-npz-input", None, ["run", "m.npz", "--block", "16", "-o", "m.npz"], "'m.npz'"),
    ("o-is-input-hard-link", lambda t: os.link(t / "m.npy", t / "hard.npz"),
     RUN + ["-o", "hard.npz"], "'hard.npz'"),
    ("o-is-input-symlink", lambda t: os.symlink("m.npy", t / "soft.npz"),
     RUN + ["-o", "soft.npz"], "'soft.npz'"),
    ("report-is-input", None, RUN + ["-o", "r.npz", "--report", "m.npy"], "'m.npy'"),
    ("report-is-o", None, RUN + ["-o", "r.npz", "--report", "r.npz"], "'r.npz'"),
    ("report-is-o-relative", None, RUN + ["-o", "r.npz", "--report", "./sub/../r.npz"],
     "'./sub/../r.npz'"),
    ("o-dev-null", None, RUN + ["-o", "/dev/null"], "'/dev/null'"),
    ("report-dev-stdout", None, RUN + ["-o", "r.npz", "--report", "/dev/stdout"],
     "'/dev/stdout'"),
    ("o-proc-fd", None, RUN + ["-o", "/proc/self/fd/1"], "'/proc/self/fd/1'"),
    ("o-symlink-to-dev-null", lambda t: os.symlink("/dev/null", t / "null.npz"),
     RUN + ["-o", "null.npz"], "'null.npz'"),
    ("o-dangling-symlink", lambda t: os.symlink("gone.npz", t / "dang.npz"),
     RUN + ["-o", "dang.npz"], "'dang.npz'"),
    ("o-fifo", lambda t: _fifo(t / "fifo.npz"), RUN + ["-o", "fifo.npz"], "'fifo.npz'"),
    ("o-dot", None, RUN + ["-o", "."], "'.'"),
    ("o-root", None, RUN + ["-o", "/"], "'/'"),
    ("o-directory", lambda t: (t / "d").mkdir(), RUN + ["-o", "d"], "'d'"),
    ("o-trailing-slash", None, RUN + ["-o", "new/"], "'new/'"),
    ("o-missing-directory", None, RUN + ["-o", "nodir/r.npz"], "nodir"),
    ("report-missing-directory", None, RUN + ["-o", "r.npz", "--report", "nodir/r.json"],
     "nodir"),
    ("o-through-a-file", None, RUN + ["-o", "m.npy/r.npz"], "'m.npy/r.npz'"),
    ("o-existing-non-result", lambda t: (t / "notes.npz").write_text("not a result"),
     RUN + ["-o", "notes.npz"], "--force"),
    ("o-existing-checkpoint", None, RUN + ["-o", "ex.npz"], "'ex.npz'"),
    ("parts-not-regroups", lambda t: _foreign_parts(t / "r.npz.parts"),
     RUN + ["-o", "r.npz"], "r.npz.parts"),
    ("parts-symlink", lambda t: (t / "elsewhere").mkdir() or os.symlink(
        "elsewhere", t / "r.npz.parts"), RUN + ["-o", "r.npz"], "r.npz.parts"),
    ("parts-is-a-file", lambda t: (t / "r.npz.parts").write_text("x"),
     RUN + ["-o", "r.npz"], "r.npz.parts"),
    ("parts-marker-symlink", lambda t: (t / "r.npz.parts").mkdir() or os.symlink(
        "../m.npy", t / "r.npz.parts" / PARTS_MARKER), RUN + ["-o", "r.npz"], "r.npz.parts"),
    ("compare-csv-dev-stdout", None, ["compare", "m.npy", "--methods", "sort", "--block",
                                      "16", "--csv", "/dev/stdout"], "'/dev/stdout'"),
    ("compare-csv-is-markdown", None, ["compare", "m.npy", "--methods", "sort", "--block",
                                       "16", "--csv", "c.md", "--markdown", "c.md"], "'c.md'"),
    ("compare-csv-is-second-input", None, ["compare", "m.npy", "m.npz", "--methods", "sort",
                                           "--block", "16", "--csv", "m.npz"], "'m.npz'"),
    ("show-o-dev-null", None, ["show", "m.npy", "--block", "16", "-o", "/dev/null"],
     "'/dev/null'"),
    ("show-o-is-input", None, ["show", "m.npy", "--block", "16", "-o", "m.npy"], "'m.npy'"),
    ("show-o-is-result", lambda t: (t / "res.npz").write_bytes(b"x"),
     ["show", "m.npy", "--block", "16", "--result", "res.npz", "-o", "res.npz"], "'res.npz'"),
    ("sweep-csv-is-md", None, ["sweep", "m.npy", "--block", "16", "--no-speed", "-q",
                               "--csv", "s.txt", "--md", "s.txt"], "'s.txt'"),
    ("sweep-plot-dev-null", None, ["sweep", "m.npy", "--block", "16", "--no-speed", "-q",
                                   "--plot", "/dev/null"], "'/dev/null'"),
    ("sweep-csv-is-input", None, ["sweep", "m.npy", "--block", "16", "--no-speed", "-q",
                                  "--csv", "m.npy"], "'m.npy'"),
    ("inspect-hgr-is-a-file", None, ["inspect", "m.npy", "--hgr", "m.npz"], "'m.npz'"),
]


@pytest.mark.parametrize("setup, argv, named", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_hostile_output_path_is_refused_before_any_work(hostile_runner, tmp_path, setup,
                                                          argv, named):
    cwd, logs = tmp_path / "cwd", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    _masks(cwd)
    if setup is not None:
        setup(cwd)
    before = snapshot(cwd)
    # In a forked child: /dev/stdout and /proc/self/fd/1 are its own files, and the
    # working directory its own.
    got = hostile_runner.run(cwd, logs, argv=argv, seconds=60)
    err = (logs / "stderr").read_text()
    lines = err.strip().splitlines()
    assert got["exit"] == 1, err
    assert len(lines) == 1 and named in lines[0], lines
    assert "error:" in lines[0] and ".tmp" not in lines[0]
    assert snapshot(cwd) == before             # inputs intact, nothing left behind


def test_a_result_file_is_replaced_by_a_rerun_and_other_files_only_with_force(tmp_path):
    _masks(tmp_path)
    out, rep = tmp_path / "r.npz", tmp_path / "r.json"
    args = ["run", str(tmp_path / "m.npy"), "--block", "16", "-q", "-o", str(out)]
    assert main(args + ["--report", str(rep)]) == 0
    first = out.read_bytes()
    assert main(args + ["--report", str(rep)]) == 0           # the same command again
    assert out.read_bytes() == first
    out.write_text("my notes")
    assert main(args) == 1 and out.read_text() == "my notes"
    assert main(args + ["--force"]) == 0 and out.read_bytes() == first
    # A link to a result file: the target is replaced, the link stays.
    os.symlink("r.npz", tmp_path / "link.npz")
    assert main(args[:-1] + [str(tmp_path / "link.npz")]) == 0
    assert (tmp_path / "link.npz").is_symlink() and out.read_bytes() == first


def test_the_api_refuses_the_same_paths(tmp_path):
    _masks(tmp_path)
    src = tmp_path / "m.npy"
    data = src.read_bytes()
    with pytest.raises(RegroupError, match=r"'out' parameter of regroup_checkpoint.*m\.npy"):
        regroup_checkpoint(src, src, block=16)
    with pytest.raises(RegroupError, match=r"'out' parameter.*'/dev/null'"):
        regroup_checkpoint(src, "/dev/null", block=16)
    run = regroup_file(src, block=16)
    with pytest.raises(RegroupError, match=r"'path' parameter of Run\.save.*the input"):
        run.save(src)
    notes = tmp_path / "notes.npz"
    notes.write_text("mine")
    with pytest.raises(RegroupError, match=r"force=True replaces it"):
        run.save(notes)
    run.save(notes, force=True)
    assert src.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex.npz", "m.npy", "m.npz",
                                                          "notes.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_results_and_reports_honour_the_umask(tmp_path, umask):
    _masks(tmp_path)
    out, rep = tmp_path / "r.npz", tmp_path / "r.json"
    rep.write_text("{}")
    os.chmod(rep, 0o600)                          # replaced: the umask decides, not the old mode
    old = os.umask(umask)
    try:
        assert main(["run", str(tmp_path / "m.npy"), "--block", "16", "-q", "-o", str(out),
                     "--report", str(rep)]) == 0
    finally:
        os.umask(old)
    for p in (out, rep):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path, capsys):
    _masks(tmp_path)
    out = tmp_path / "r.npz"
    held = PartsDir.claim(str(out))                # a run in progress holds the lock
    try:
        t0 = time.perf_counter()
        assert main(["run", str(tmp_path / "m.npy"), "--block", "16", "-q",
                     "-o", str(out)]) == 1
        assert time.perf_counter() - t0 < 5
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "r.npz.parts" in err[0] and "another regroup run" in err[0]
        assert not out.exists() and (tmp_path / "r.npz.parts" / PARTS_MARKER).exists()
    finally:
        held.keep()
    assert not (tmp_path / "r.npz.parts").exists()   # it held no part: removed
    assert main(["run", str(tmp_path / "m.npy"), "--block", "16", "-q", "-o", str(out)]) == 0


def test_an_interrupted_run_leaves_a_marked_parts_directory_that_resumes(tmp_path):
    _masks(tmp_path)
    src, out = tmp_path / "m.npz", tmp_path / "r.npz"

    def stop(name, done, total, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, block=16, progress=stop)
    parts = tmp_path / "r.npz.parts"
    assert (parts / PARTS_MARKER).is_file() and list(parts.glob("*.npz"))
    run = regroup_checkpoint(src, out, block=16)
    assert run.stats["resumed"] == 1 and not parts.exists()
    fresh = tmp_path / "fresh.npz"
    regroup_checkpoint(src, fresh, block=16)
    assert out.read_bytes() == fresh.read_bytes()


def test_default_output_names_keep_the_whole_input_name(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "model.a.npy", rng.random((32, 48)) < 0.3)
    np.savez(tmp_path / "model.b.npz", w=rng.random((32, 48)) < 0.3)
    monkeypatch.chdir(tmp_path)
    for name in ("model.a.npy", "model.b.npz"):
        assert main(["run", name, "--block", "16", "-q"]) == 0
    assert (tmp_path / "model.a.npy.regroup.npz").exists()
    assert (tmp_path / "model.b.npz.regroup.npz").exists()
    assert default_output("ckpt/llama/") == "llama.regroup.npz"
    assert default_output("/") == "regroup.regroup.npz"


# -- child processes ----------------------------------------------------------------------
# The parent is started without the current directory on its path (as the console script
# is); its children must not put it back.
_CLI = [sys.executable, "-c", "import sys; sys.path.pop(0); from regroup.cli import main; "
        "sys.exit(main())"]


@pytest.mark.parametrize("options", [["--jobs", "2"], ["--method", "metis", "--time-limit", "30"],
                                     ["--method", "kahypar"]],
                         ids=["jobs", "time-limit", "kahypar"])
def test_children_never_import_from_the_working_directory(tmp_path, options):
    if options[1] == "kahypar":
        pytest.importorskip("kahypar")
    if "metis" in options:
        pytest.importorskip("pymetis")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran"
    for name in ("json.py", "pickle.py"):
        (cwd / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    _masks(tmp_path)
    proc = subprocess.run(_CLI + ["run", str(tmp_path / "m.npz"), "--block", "16", "-q", "-o",
                                  str(tmp_path / "r.npz"), *options],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent(tmp_path):
    _masks(tmp_path)
    # Long layers (annealing), so that the workers are busy when the parent is killed.
    proc = subprocess.Popen(_CLI + ["run", str(tmp_path / "ex.npz"), "--block", "16", "-q",
                                    "--anneal", "60", "--jobs", "2", "-o",
                                    str(tmp_path / "r.npz")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(workers) < 3:   # 2 workers + the tracker
            time.sleep(0.2)
            workers = child_pids(proc.pid)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(2.0)                   # past their start-up, inside a layer
        assert not kill_parent(proc, workers, 10)
    finally:
        for p in [proc.pid, *workers]:
            if process_alive(p):
                os.kill(p, signal.SIGKILL)
