"""Stress run of the hostile-input generators (issue 15): the fuzz suite and the hostile
case table, each at many cases, with their figures.

    python benchmarks/stress.py                    # 1,000 per fuzz test, 1,000 hostile cases
    python benchmarks/stress.py --fuzz 100 --hostile 100     # a shorter run

Runs ``tests/test_fuzz.py`` with ``REGROUP_FUZZ_EXAMPLES=--fuzz`` (per test; hypothesis
stops earlier on a test whose whole space it has covered) and ``tests/test_hostile.py``'s
stress test with ``REGROUP_HOSTILE_CASES=--hostile`` (the kinds in turn, fresh seeds),
each case logged by the tests (``REGROUP_CASE_LOG``). Writes ``results/stress.md``: cases,
failed tests, the slowest case and the largest peak memory of each suite. The bounds the
tests enforce per case: 30 s; hostile cases 1 GiB of RSS (and of address space beyond the
runner's), fuzz cases 256 MiB of traced allocations per loader call.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _pytest(args: list[str], env: dict[str, str], tmp: str) -> tuple[int, str, float, float]:
    """Run pytest; (exit status, its summary line, wall seconds, the peak RSS in MB of it
    and of the processes it waited for)."""
    out = Path(tmp) / "pytest.out"
    t0 = time.perf_counter()
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
                                 *args], cwd=ROOT, env={**os.environ, **env}, stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = out.read_text()
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    if code:
        print(text[-6000:], file=sys.stderr)
    return code, (lines[-1] if lines else "no summary"), wall, usage.ru_maxrss / 1024


def _failed(summary: str) -> int:
    m = re.search(r"(\d+) failed", summary)
    return int(m.group(1)) if m else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=1000, help="examples per fuzz test")
    ap.add_argument("--hostile", type=int, default=1000, help="hostile cases")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suite, env, tests in (
                ("fuzz", {"REGROUP_FUZZ_EXAMPLES": str(args.fuzz)}, ["tests/test_fuzz.py"]),
                ("hostile", {"REGROUP_HOSTILE_CASES": str(args.hostile)},
                 ["tests/test_hostile.py", "-m", "slow", "-k", "stress"])):
            log = Path(tmp) / f"{suite}.jsonl"
            code, summary, wall, rss = _pytest(tests, {**env, "REGROUP_CASE_LOG": str(log)},
                                               tmp)
            cases = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() \
                else []
            if suite == "fuzz":        # one case = its loaders' step and its CLI step
                n = sum(1 for c in cases if c["step"] == "cli")
                peak = max((c["peak_mb"] for c in cases if c["peak_mb"] is not None), default=0)
                memory = f"{peak:.0f} MB traced per loader call; pytest process {rss:.0f} MB RSS"
                slowest = max(cases, key=lambda c: c["seconds"], default=None)
                where = slowest and f"{slowest['step']} {slowest['file']}"
            else:
                n = len(cases)
                peak = max((c["rss_mb"] for c in cases), default=0)
                memory = f"{peak:.0f} MB RSS per case (forked child)"
                slowest = max(cases, key=lambda c: c["seconds"], default=None)
                where = slowest and f"{slowest['cls']}:{slowest['kind']} seed {slowest['seed']}"
            rows.append({"suite": suite, "cases": n, "failed tests": _failed(summary),
                         "exit": code, "max seconds": slowest["seconds"] if slowest else 0,
                         "slowest": where, "max memory": memory, "wall min": wall / 60,
                         "pytest": summary.strip("= ")})
    lines = ["| suite | cases | failed tests | pytest exit | max s per case | slowest case | "
             "max memory | wall min |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['cases']} | {r['failed tests']} | {r['exit']} | "
                     f"{r['max seconds']:.2f} | {r['slowest']} | {r['max memory']} | "
                     f"{r['wall min']:.1f} |")
    lines.append("")
    lines += [f"{r['suite']}: pytest says `{r['pytest']}`" for r in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "stress.md").write_text(text)
    print(text)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
