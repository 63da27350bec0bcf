"""Run hostile cases one by one, each in a forked child under resource limits.

``python tests/hostile_runner.py`` imports regroup (and its torch adapter when torch is
installed) once, prints ``ready``, then reads one JSON request per line from stdin and
answers one JSON line per request on stdout::

    {"cwd": DIR, "logs": DIR, "op": "cli", "argv": [...], "seconds": 30, "rss_mb": 1024}

The child starts a new session (so that the workers it spawns can be killed with it),
sets its umask, moves to ``cwd``, writes its stdout and stderr to ``logs/stdout`` and
``logs/stderr``, and may map at most ``rss_mb`` MiB more address space than the server
holds (RLIMIT_AS: an allocation beyond it fails instead of swapping the machine). The
answer gives its exit status, its peak resident set (``ru_maxrss``, with the workers it
waited for), its wall time, and whether it was killed at ``seconds``.

``op`` is ``"cli"`` (``regroup.cli.main(argv)``) or one of :data:`OPS`, model-side checks
that need a live PyTorch model; an op writes its findings to ``logs/op.json`` and exits 0,
or exits 3 when a property it checks does not hold (the message in ``logs/stderr``).
Forking keeps each case cheap (no interpreter start, no imports) and isolates it: a case
that crashes, hangs or exhausts its limit costs only its own child.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import sys
import time
import traceback

if __name__ == "__main__":
    sys.path.pop(0)      # the tests folder: children import only what the project installs
    # One thread per child: the cases measure regroup, not a BLAS thread pool, and forked
    # children must not inherit half-started pools.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402

import regroup  # noqa: E402
from regroup.cli import main as cli_main  # noqa: E402

try:                     # the model cases need torch; the CLI cases run without it
    import torch
    from torch import nn
    from torch.nn.utils import parametrize
    import torch.nn.utils.parametrizations  # noqa: F401  (weight_norm)

    from regroup.adapters.torch import apply_result, regroup_model
except ImportError:      # pragma: no cover - the test extras install torch
    torch = None


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


# -- model-side operations ------------------------------------------------------------------
class _Scale(nn.Module if torch is not None else object):
    """A parametrization that is not a pruning mask: regroup must leave its weight alone."""

    def forward(self, w):
        return 2 * w


def _chain(p: dict):
    """An MLP over ``p["widths"]``, magnitude-pruned to ``p["density"]`` by zeroing, with
    the hostile twist ``p["twist"]`` applied (built twice from the seed: model and twin)."""
    torch.manual_seed(p["seed"])
    widths = p["widths"]
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])
    k = p["layer"] % len(layers)
    if p["twist"] == "tied":
        square = [i for i in range(len(layers) - 1)
                  if layers[i].weight.shape == layers[i + 1].weight.shape]
        if square:
            layers[square[0] + 1].weight = layers[square[0]].weight
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            cut = w.abs().flatten().kthvalue(max(1, int((1 - p["density"]) * w.numel()))).values
            w.mul_(w.abs() > cut)
    if p["twist"] == "parametrization":
        parametrize.register_parametrization(layers[k], "weight", _Scale())
    elif p["twist"] == "weight-norm":
        torch.nn.utils.parametrizations.weight_norm(layers[k])
    return model.eval()


def _state(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() + str(tuple(v.shape)).encode()
            for k, v in model.state_dict().items()}


def op_model(p: dict, logs: str) -> int:
    """A pruned MLP with one hostile twist, regrouped in fold mode. Either regroup refuses
    with a RegroupError and the model is unchanged, or the regrouped model computes what
    the same masks compute on the unpermuted twin (1e-5)."""
    model, twin = _chain(p), _chain(p)
    x = torch.randn(8, p["widths"][0], generator=torch.Generator().manual_seed(p["seed"]))
    if p["twist"] == "meta":
        model = model.to("meta")
    before = _state(model) if p["twist"] != "meta" else None
    findings: dict = {"twist": p["twist"]}
    try:
        plan = regroup_model(model, block=p["block"], method="sort", mode="fold",
                             example_inputs=(x,), seed=p["seed"])
        if p["twist"] == "tampered-result":
            name = next(iter(plan.layers))
            bad = plan.layers[name]
            perm = np.array(bad.row_perm)
            perm[0] = perm[-1]                  # no longer a permutation
            findings["tampered"] = name
            before = _state(twin)
            apply_result(twin, {name: dataclasses.replace(bad, row_perm=perm)})
            raise AssertionError("apply_result accepted a row order that is no permutation")
    except regroup.RegroupError as exc:
        findings["error"] = str(exc)
        target = twin if p["twist"] == "tampered-result" else model
        if before is not None and _state(target) != before:
            raise AssertionError(f"{p['twist']}: the model changed although regroup "
                                 "failed") from None
    else:
        findings["skipped"] = sorted(plan.skipped)
        findings["folds"] = len(plan.folds)
        apply_result(twin, plan.layers)
        with torch.no_grad():
            err = float((model(x) - twin(x)).abs().max())
        findings["max_error"] = err
        if not err <= 1e-5:
            raise AssertionError(f"{p['twist']}: the regrouped model differs by {err:.3g}")
    with open(os.path.join(logs, "op.json"), "w") as f:
        json.dump(findings, f)
    return 0


def op_load(p: dict, logs: str) -> int:
    """``regroup.load_result(p["path"])``: its outcome in ``logs/op.json``."""
    found: dict = {"error": None}
    try:
        regroup.load_result(p["path"])
    except Exception as exc:                  # the caller checks the type and message
        found = {"error": type(exc).__name__, "message": str(exc)}
    with open(os.path.join(logs, "op.json"), "w") as f:
        json.dump(found, f)
    return 0


OPS = {"model": op_model, "load": op_load}


# -- the server ------------------------------------------------------------------------------
def _child(req: dict, base_vm: int) -> int:
    os.setsid()
    os.umask(req.get("umask", 0o022))
    limit = base_vm + int(req["rss_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(req["seconds"]) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    logs = req["logs"]
    fd_in = os.open(os.devnull, os.O_RDONLY)
    fd_out = os.open(os.path.join(logs, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fd_err = os.open(os.path.join(logs, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd_in, 0)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    os.chdir(req["cwd"])
    os.environ.update(req.get("env") or {})
    if req.get("env") and "dask.config" in sys.modules:
        sys.modules["dask.config"].refresh()
    try:
        if req["op"] == "cli":
            return int(cli_main(req["argv"]))
        return OPS[req["op"]](req.get("params", {}), logs)
    except BaseException:            # the harness reports it; the case then fails
        traceback.print_exc()
        return 3
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _run(req: dict, base_vm: int) -> dict:
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:                                   # child
        code = 3
        try:
            code = _child(req, base_vm)
        finally:
            os._exit(code)
    deadline = t0 + float(req["seconds"])
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    # Workers the child started but did not reap (it was killed): stop them too.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = os.waitstatus_to_exitcode(status)
    return {"exit": code, "seconds": seconds, "timed_out": timed_out,
            "maxrss_mb": usage.ru_maxrss / 1024}


def serve() -> None:
    base_vm = _vm_bytes()
    print(json.dumps({"ready": True, "torch": torch is not None,
                      "base_vm_mb": base_vm / 2**20}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(_run(json.loads(line), base_vm)), flush=True)


# -- the client (the tests' side) ---------------------------------------------------------------
class Runner:
    """This server in a subprocess; :meth:`run` sends one case and returns its answer."""

    def __init__(self) -> None:
        import subprocess
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=os.path.dirname(here))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the hostile-case runner did not start")
        self.info = json.loads(line)

    def run(self, cwd, logs, *, op: str = "cli", argv: list[str] | None = None,
            params: dict | None = None, seconds: float = 30, rss_mb: int = 1024,
            umask: int = 0o022, env: dict | None = None) -> dict:
        """Run one case in ``cwd`` (its output in ``logs``); the answer as a dict."""
        req = {"cwd": str(cwd), "logs": str(logs), "op": op, "argv": argv,
               "params": params or {}, "seconds": seconds, "rss_mb": rss_mb,
               "umask": umask, "env": env or {}}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the hostile-case runner died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
