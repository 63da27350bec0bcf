"""The ``regroup`` command line: run, inspect, compare, show, sweep.

Every subcommand is a thin wrapper over a library call and builds exactly one
:class:`regroup.RegroupOptions`. Exit codes: 0 success; 1 a documented failure (bad file,
data or tool), one line on stderr; 2 usage (argparse, or an invalid option value);
70 an internal error (a bug in regroup), one line unless ``--traceback``; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from . import __version__
from .validation import (RegroupError, check_regular, missing_dependency, open_regular,
                          printable, safe_filename)
from .options import DENSE_ABOVE, LAYOUT_FORMATS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
RUN_COLUMNS = ("name", "matrix_shape", "nnz", "chosen", "retained", "retained_identity",
               "kept_blocks", "fill", "seconds")
# N:M layers have no blocks: the kept |w| against plain N:M, and the share of the gap to
# unstructured at the same density that the permutation closes.
NM_RUN_COLUMNS = ("name", "matrix_shape", "nnz", "chosen", "retained", "retained_identity",
                  "retained_magnitude", "retained_magnitude_identity", "efficacy", "seconds")
# The default --methods of compare, per kind of format.
COMPARE_METHODS = "identity,sort,hierarchical,metis,auto"
COMPARE_NM_METHODS = "auto,asp"


def _add_layout_options(p: argparse.ArgumentParser, *, method: bool = True,
                        budget: bool = True) -> None:
    p.add_argument("--block", default="32", help="block shape: 32 or 32x16 (rows x cols); "
                   "not with --format nm (its group, 1xM, is the block)")
    p.add_argument("--format", default="grid", choices=LAYOUT_FORMATS,
                   help="grid: BSR after row+column permutation; shuffled: per-panel tiles; "
                   "nm: input-column permutation + N:M mask (see --nm)")
    p.add_argument("--nm", default=None, metavar="N:M",
                   help="with --format nm: keep N of every M input columns (default 2:4; "
                   "also 1:4, 4:8, 2:8, ...)")
    if method:
        p.add_argument("--method", default="auto", help="partitioner, e.g. auto, metis, "
                       "hierarchical:linkage=complete (see `regroup run --list-methods`); "
                       "with --format nm: auto (regroup's search) or asp")
    if budget:
        p.add_argument("--budget", default="iso",
                       help="iso | density=D | blocks=K | retained=R (default: iso)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="only layers whose name matches GLOB (repeatable)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="seconds per partitioner call (run in a subprocess) and per "
                   "refinement (whose result then depends on the machine's speed)")
    p.add_argument("--anneal", type=float, default=None, metavar="S",
                   help="seconds of simulated annealing after refinement (deterministic "
                   "for a seed: moves are counted, not timed)")
    p.add_argument("--refine", default="auto", choices=("auto", "on", "off"),
                   help="retained-mass local search after partitioning (auto: only for "
                   "--method auto)")
    p.add_argument("--dense-above", type=float, default=DENSE_ABOVE, metavar="F",
                   help="skip tensors whose density is above F: not pruned (default "
                   f"{DENSE_ABOVE}; 1 skips only fully dense ones)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="regroup", description=__doc__.splitlines()[0])
    ap.add_argument("-V", "--version", action="version", version=f"regroup {__version__}")
    ap.add_argument("--traceback", action="store_true",
                    help="on an internal error, print the whole traceback")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="regroup a mask or checkpoint file",
                       description="Regroup every selected layer of INPUT; write the result "
                       "file (-o) and optionally a JSON report.")
    p.add_argument("input", nargs="?", help="mask or checkpoint (.smtx .mtx .npy .npz "
                   ".safetensors .pt .pth .bin .ckpt), a sharded safetensors directory, or "
                   "its model.safetensors.index.json")
    p.add_argument("-o", "--output", help="result file (default: INPUT_NAME.regroup.npz, "
                   "e.g. model.pt.regroup.npz, in the current directory)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file that "
                   "is not a regroup result (a regroup result is always replaced)")
    p.add_argument("--report", help="JSON report path")
    p.add_argument("--objective", default="auto", choices=("auto", "count", "magnitude"))
    p.add_argument("--edge", default="partial", choices=("partial", "error"),
                   help="shapes not divisible by the block: short edge blocks, or error")
    p.add_argument("--budget-scope", default="layer", choices=("layer", "global"),
                   help="global: one model-wide budget spent where blocks retain most")
    p.add_argument("--layer-min", type=float, default=0.0, metavar="F",
                   help="with --budget-scope global: share of each layer's own budget "
                   "reserved for it (default 0)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="layers regrouped in N worker processes (or dask workers)")
    p.add_argument("--engine", default="local", choices=("local", "dask"),
                   help="local processes, or a dask.distributed cluster")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler address "
                   "(default: a local cluster of --jobs workers)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no table, no progress (a bar on a terminal, else a line per layer)")
    p.add_argument("--list-methods", action="store_true", help="list partitioners and exit")
    _add_layout_options(p)

    p = sub.add_parser("inspect", help="list the layers of a file or a result file")
    p.add_argument("input")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB")
    p.add_argument("--dense-above", type=float, default=DENSE_ABOVE, metavar="F",
                   help=f"list tensors denser than F as skipped (default {DENSE_ABOVE})")
    p.add_argument("--hgr", metavar="DIR", help="also write each layer's column-net "
                   "hypergraph as DIR/<layer>.hgr (hMETIS format) for external tools")

    p = sub.add_parser("compare", help="compare methods on files (CSV and Markdown)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated method specs (default: {COMPARE_METHODS}; with "
                   f"--format nm: {COMPARE_NM_METHODS})")
    p.add_argument("--csv", help="per-layer CSV output")
    p.add_argument("--markdown", help="Markdown summary output")
    _add_layout_options(p, method=False)

    p = sub.add_parser("show", help="PNG of one layer before and after regrouping")
    p.add_argument("input")
    p.add_argument("--layer", help="layer name (default: the first usable layer)")
    p.add_argument("--result", help="use the layout stored in this result file")
    p.add_argument("-o", "--output", required=True, help="PNG path")
    _add_layout_options(p)

    from .kernel_speed import BATCH
    from .sweep import DEFAULT_BUDGETS, DEFAULT_METHODS
    p = sub.add_parser("sweep", help="retained and CPU speed-up against block density over "
                       "a range of budgets (CSV, Markdown, PNG)",
                       description="Regroup every selected layer of INPUT with each method "
                       "at each budget; report, per layer and for the model, block density, "
                       "retained (count and |w|) and the CPU block-sparse speed-up at that "
                       "density.")
    p.add_argument("input", help="mask or checkpoint, as for `regroup run`")
    p.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS),
                   help="comma-separated budgets (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method specs (default: %(default)s)")
    p.add_argument("--no-speed", action="store_true",
                   help="do not time the block-sparse products (no torch needed)")
    p.add_argument("--batch", type=int, default=BATCH, metavar="N",
                   help="input rows of the timed products (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads while timing (default: torch's, all cores)")
    p.add_argument("--csv", help="CSV of the model and layer rows")
    p.add_argument("--md", "--markdown", dest="md", help="Markdown report")
    p.add_argument("--plot", help="PNG: retained and speed-up against block density")
    p.add_argument("--objective", default="auto", choices=("auto", "count", "magnitude"))
    p.add_argument("--edge", default="partial", choices=("partial", "error"),
                   help="shapes not divisible by the block: short edge blocks, or error")
    p.add_argument("-q", "--quiet", action="store_true", help="no table, no progress")
    _add_layout_options(p, method=False, budget=False)
    return ap


class _Progress:
    """Progress on stderr: a tqdm bar on a terminal (created on the first update, when the
    total is known); elsewhere (a log file, a pipe, CI) one line per finished layer, so a
    long run is seen to advance; nothing when ``mode`` is None."""

    def __init__(self, mode: str | None, unit: str) -> None:
        self.mode, self.unit, self.bar = mode, unit, None

    @classmethod
    def for_stderr(cls, enabled: bool, unit: str) -> _Progress:
        return cls(None if not enabled else "bar" if sys.stderr.isatty() else "lines", unit)

    def __call__(self, name: str, index: int, total: int, info: dict) -> None:
        name = printable(name)
        if self.mode == "lines":
            print(_progress_line(name, index, total, info or {}), file=sys.stderr, flush=True)
            return
        if self.mode != "bar":
            return
        if self.bar is None or self.bar.total != total:
            self.close()
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        self.bar.n = index
        self.bar.set_postfix_str(name[-40:], refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_line(name: str, index: int, total: int, info: dict) -> str:
    """``[3/36] encoder.layer.0.attention.self.query.weight 384x384: 2.1 s, retained
    0.4431`` (or ``resumed``, or ``skipped: reason``); control characters escaped."""
    shape = "x".join(map(str, info["shape"])) if info.get("shape") else "?"
    head = f"[{index}/{total}] {printable(name)} {shape}: "
    if info.get("status") == "skipped":
        return head + f"skipped: {printable(info.get('reason'))}"
    if info.get("cached"):
        return head + "resumed from an earlier run's part"
    seconds, retained = info.get("seconds"), info.get("retained")
    return head + ", ".join(
        ([f"{seconds:.2f} s"] if seconds is not None else [])
        + ([f"retained {retained:.4f}"] if retained is not None else []))


def _shown(rows: list[dict]) -> list[dict]:
    """``rows`` with every str value made safe for a terminal (tensor names and reasons
    come from input files: their control characters are escaped, never printed raw)."""
    return [{k: printable(v) if isinstance(v, str) else v for k, v in r.items()}
            for r in rows]


def _check_inputs(paths: dict[str, str | None], directories: bool = False) -> None:
    """Refuse, before any work, an input that is not a regular file (a FIFO or device
    would block or be consumed when opened); ``directories``: a directory passes (a
    sharded checkpoint), to be checked when it is opened."""
    for what, path in paths.items():
        if path is not None and not (directories and os.path.isdir(path)):
            check_regular(path, what)


def _options(args, **extra):
    """The one RegroupOptions of a command, from its arguments."""
    from .options import resolve_options

    fields = dict(block=args.block, format=args.format, nm=args.nm, seed=args.seed,
                  layers=args.layers, time_limit=args.time_limit, anneal=args.anneal,
                  refine={"auto": None, "on": True, "off": False}[args.refine],
                  dense_above=args.dense_above)
    if getattr(args, "method", None) is not None:
        fields["method"] = args.method
    for name in ("budget", "objective", "edge", "budget_scope", "layer_min"):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    fields.update(extra)
    return resolve_options(None, f"regroup {args.command}", **fields)


def cmd_run(args) -> int:
    from ._outputs import check_outputs, default_output
    from .partitioners import available_partitioners, get_partitioner, list_partitioners
    from .pipeline import regroup_checkpoint
    from .report import format_table, write_json

    if args.list_methods:
        avail = set(available_partitioners())
        for n in list_partitioners():
            spec = get_partitioner(n)
            opts = ", ".join(f"{k}={v}" for k, v in spec.params.items())
            flag = "" if n in avail else "  [not installed: " + ", ".join(spec.requires) + "]"
            print(f"{n:13s} {spec.description}" + (f" ({opts})" if opts else "") + flag)
        return EXIT_OK
    if not args.input:
        raise _Usage("the following arguments are required: input")
    options = _options(args)
    _check_inputs({"input": args.input}, directories=True)
    out = args.output or default_output(args.input)
    check_outputs({"-o": out, "--report": args.report}, "regroup run",
                  inputs={"input": args.input}, results=("-o",), force=args.force)
    progress = _Progress.for_stderr(not args.quiet, "layer")
    try:
        # Streamed: one layer in memory per worker, finished layers kept in OUT.parts so
        # that an interrupted run resumes; the same bytes as regroup_file.
        run = regroup_checkpoint(args.input, out, options=options, jobs=args.jobs,
                                 engine=args.engine, scheduler=args.scheduler,
                                 progress=progress, force=args.force)
    finally:
        progress.close()
    report = run.report()
    if args.report:
        write_json(report, args.report)
    if not args.quiet:
        nm = options.nm
        print(format_table(_shown(report["layers"]),
                           NM_RUN_COLUMNS if nm is not None else RUN_COLUMNS))
        t = report["total"]
        scope = "model" if options.budget_scope == "global" else "layer"
        how = (f"nm {nm[0]}:{nm[1]}, method {options.method}" if nm is not None else
               f"{options.format} {args.block}, budget {options.budget} per {scope}")
        print(f"\n{t['layers']} layers, nnz {t['nnz']}: retained {t['retained']:.4f} vs "
              f"identity {t['retained_identity']:.4f} ({how}, seed {options.seed}); "
              f"{len(report['skipped'])} tensors skipped; {t['seconds']:.1f} s"
              + (f"; {t['resumed']} layers resumed" if t.get("resumed") else ""))
        print(f"result: {out}" + (f"   report: {args.report}" if args.report else ""))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .report import format_table

    path = args.input
    if not os.path.isdir(path):       # a directory is refused by the reader, by name
        _check_inputs({"input": path})
    if args.hgr:
        from ._outputs import check_outputs
        check_outputs({"--hgr": args.hgr}, "regroup inspect", inputs={"input": path},
                      directories=("--hgr",))
    if path.endswith(".regroup.npz") or _is_result(path):
        # Checked whole, a few mask rows at a time (the masks are not kept). Plans and API
        # saves may lack options, versions and metrics: those print as "-".
        from .result import check_result
        doc = check_result(path)
        # An N:M layer shows its pattern where a block layer shows its block.
        rows = [{"name": r["name"], "shape": r["shape"], "format": r["format"],
                 "block": (":".join(map(str, r["nm"])) if r["format"] == "nm"
                           else r["block_shape"]),
                 "method": r["method"], "chosen": r["metrics"].get("chosen"),
                 "retained": r["metrics"].get("retained"),
                 "kept_blocks": r["metrics"].get("kept_blocks")} for r in doc["layers"]]
        print(format_table(_shown(rows), list(rows[0]) if rows else ["name"]))
        print(f"\nresult file, format version {doc['format_version']}, seed "
              f"{doc.get('options', {}).get('seed', '-')}, regroup "
              f"{doc.get('versions', {}).get('regroup', '-')}")
        return EXIT_OK
    from .io import read_patterns
    from .options import resolve_options
    selection = resolve_options(None, "regroup inspect", layers=args.layers,
                                dense_above=args.dense_above)
    pats, skipped = read_patterns(path, layers=selection.layers,
                                  dense_above=selection.dense_above)
    rows = [{"name": p.name, "shape": list(p.shape), "matrix": [p.n_rows, p.n_cols],
             "nnz": p.nnz, "density": p.density, "weights": "yes" if p.has_weights else "no"}
            for p in pats]
    targets = _hgr_targets(args.hgr, [p.name for p in pats]) if args.hgr else []
    print(format_table(_shown(rows), ["name", "shape", "matrix", "nnz", "density",
                                      "weights"]))
    if args.hgr:
        from .hypergraph import column_net, write_hgr
        os.makedirs(args.hgr, exist_ok=True)
        for p, target in zip(pats, targets):
            write_hgr(column_net(p), target)
        print(f"\nwrote {len(pats)} .hgr files to {args.hgr}")
    if skipped:
        print(f"\nskipped {len(skipped)}:")
        for n, r in skipped:
            print(f"  {printable(n)}: {printable(r)}")
    return EXIT_OK


def _hgr_targets(folder: str, names: list[str]) -> list[str]:
    """``folder/<name>.hgr`` for each layer, every file name made safe and distinct
    (:func:`regroup.validation.safe_filename`) before anything is written; names that
    would still meet on a case-insensitive file system are refused, naming them."""
    files = [safe_filename(n) + ".hgr" for n in names]
    seen: dict[str, str] = {}
    for n, f in zip(names, files):
        other = seen.setdefault(f.casefold(), n)
        if other != n:
            raise RegroupError(f"{folder}: layers {other!r} and {n!r} would be written to "
                               "the same .hgr file on a case-insensitive file system; "
                               "select one with --layers")
    return [os.path.join(folder, f) for f in files]


def _is_result(path: str) -> bool:
    """Whether ``path`` is a zip archive holding ``meta.json`` (a result file); anything
    but a regular file is refused before it is opened (a FIFO would block)."""
    import zipfile

    with open_regular(path, "input") as f:
        try:
            with zipfile.ZipFile(f) as z:
                return "meta.json" in z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return False


def cmd_compare(args) -> int:
    from ._outputs import check_outputs
    from .compare import COLUMNS, SUMMARY_COLUMNS, compare, summarize
    from .report import format_table, markdown_table, write_csv

    options = _options(args)
    spec = args.methods or (COMPARE_NM_METHODS if options.format == "nm" else COMPARE_METHODS)
    methods = [m.strip() for m in spec.split(";" if ";" in spec else ",") if m.strip()]
    _check_inputs({f"input {i + 1}": p for i, p in enumerate(args.inputs)})
    check_outputs({"--csv": args.csv, "--markdown": args.markdown}, "regroup compare",
                  inputs={f"input {i + 1}": p for i, p in enumerate(args.inputs)})
    progress = _Progress("bar" if sys.stderr.isatty() else None, "run")
    skipped: list[dict] = []
    try:
        rows = compare(args.inputs, methods, options=options, progress=progress,
                       on_skip=lambda f, n, r: skipped.append({"file": f, "layer": n,
                                                               "reason": r}))
    finally:
        progress.close()
    summary = summarize(rows)
    if args.csv:
        write_csv(rows, COLUMNS, args.csv)
    if args.markdown:
        from ._atomic import atomic_write
        with atomic_write(args.markdown) as f:
            f.write(markdown_table(summary, SUMMARY_COLUMNS) + "\n")
            if skipped:
                f.write("\nSkipped tensors:\n\n"
                        + markdown_table(skipped, ("file", "layer", "reason")) + "\n")
    print(format_table(_shown(summary), SUMMARY_COLUMNS))
    # As run: the count here, the reasons in the report (--markdown; `inspect` lists them).
    print(f"\n{len(skipped)} tensors skipped" + (
        f"; reasons in {args.markdown}" if args.markdown and skipped else
        "; `regroup inspect FILE` or --markdown lists the reasons" if skipped else ""))
    return EXIT_OK


def cmd_show(args) -> int:
    from ._outputs import check_outputs
    from .engine import regroup_pattern
    from .io import read_patterns
    from .plot import plot_layer

    options = _options(args, layers=[args.layer] if args.layer else None)
    _check_inputs({"input": args.input, "--result file": args.result})
    check_outputs({"-o": args.output}, "regroup show",
                  inputs={"input": args.input, "--result": args.result})
    # The first usable layer is one the block fits (a MobileNet's 32x27 stem is not).
    pats, _ = read_patterns(args.input, layers=options.layers, block=options.block,
                            dense_above=options.dense_above, nm=options.nm)
    pat = pats[0]
    if args.result:
        from .result import load_result
        res = load_result(args.result)
        if pat.name not in res:
            raise RegroupError(f"{args.result}: no layer {pat.name!r} (has: "
                               f"{', '.join(map(repr, list(res)[:8]))})")
        result = res[pat.name]
    else:
        result = regroup_pattern(pat, options=options.per_layer())
    plot_layer(pat, result, args.output)
    print(f"{args.output}: {printable(pat.name)}, retained "
          f"{result.metrics['retained']:.4f} (identity "
          f"{result.metrics['retained_identity']:.4f})")
    return EXIT_OK


SWEEP_COLUMNS = ("method", "budget", "block_density", "retained", "retained_magnitude",
                 "kept_blocks", "speedup", "seconds")


def cmd_sweep(args) -> int:
    from ._outputs import check_outputs
    from .report import format_table, write_csv
    from .sweep import CSV_COLUMNS, sweep

    from .options import check_budget

    options = _options(args)
    for entry in args.budgets.split(","):
        if entry.strip():        # empty and repeated entries: sweep names them
            check_budget(entry.strip(), "budgets", "sweep")
    _check_inputs({"input": args.input}, directories=True)
    outputs = [o for o in (args.csv, args.md, args.plot) if o]
    check_outputs({"--csv": args.csv, "--md": args.md, "--plot": args.plot}, "regroup sweep",
                  inputs={"input": args.input})
    if args.plot:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise missing_dependency("matplotlib", "regroup sweep --plot")
    progress = _Progress.for_stderr(not args.quiet, "run")
    try:
        result = sweep(args.input, budgets=args.budgets, methods=args.methods,
                       options=options, speed=not args.no_speed, batch=args.batch,
                       threads=args.threads, progress=progress)
    finally:
        progress.close()
    if args.csv:
        write_csv(result.csv_rows(), CSV_COLUMNS, args.csv)
    if args.md:
        from ._atomic import atomic_write
        with atomic_write(args.md) as f:
            f.write(result.markdown())
    if args.plot:
        from .plot import plot_sweep
        plot_sweep(result, args.plot)
    if not args.quiet:
        print(format_table(_shown(result.model), SWEEP_COLUMNS))
        sp = result.speed
        speed = (f"speed-up: torch {sp['torch']} BSR vs dense, fp32, batch {sp['batch']}, "
                 f"{sp['threads']} threads" if sp["measured"]
                 else f"speed-up not measured: {sp['note']}")
        print("\n" + result.summary())
        print(f"\n{len({r['layer'] for r in result.layers})} layers, "
              f"{len(result.skipped)} tensors skipped; {options.format} {args.block}, seed "
              f"{options.seed}; {speed}; {result.seconds:.1f} s")
        if outputs:
            print("wrote " + ", ".join(outputs))
    return EXIT_OK


class _Usage(Exception):
    pass


def _as_option(msg: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A usage error of the API (``The 'time_limit' parameter of regroup_checkpoint
    must be ...``) as the command line spells it (``The '--time-limit' option of regroup
    run must be ...``), when the parameter is an option of ``command``."""
    match = re.match(r"(The|Each entry of the) '(\w+)' parameter of (.+?) must be ", msg)
    if match is None:
        return msg
    sub = next(a for a in parser._actions                    # noqa: SLF001 - no public API
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    option = next((max(a.option_strings, key=len) for a in sub._actions
                   if a.dest == match.group(2) and a.option_strings), None)
    if option is None:
        return msg
    return f"{match.group(1)} {option!r} option of regroup {command} must be " \
        + msg[match.end():]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regroup`` console script; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    handler = {"run": cmd_run, "inspect": cmd_inspect, "compare": cmd_compare,
               "show": cmd_show, "sweep": cmd_sweep}[args.command]
    prefix = f"regroup {args.command}: "
    try:
        return handler(args)
    except _Usage as exc:
        parser.print_usage(sys.stderr)
        print(f"{prefix}error: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (RegroupError, ValueError, TypeError, ImportError, OSError) as exc:
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
            msg = f"{exc.filename}: {msg}"
        # Bad option values are usage errors; bad files, data and tools are failures.
        usage = isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, RegroupError)
        if usage:
            msg = _as_option(msg, parser, args.command)
        # One line, whatever a file put in the names it quotes.
        print(f"{prefix}error: {printable(msg)}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prefix}interrupted; no result file was written (finished layers are kept "
              "in OUTPUT.parts: rerun the same command to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not bad input: one line, no partial file
        if args.traceback:
            import traceback
            traceback.print_exc()
        where = "".join(f" ({note})" for note in getattr(exc, "__notes__", []))
        print(f"{prefix}internal error: {type(exc).__name__}: {printable(exc)}"
              f"{printable(where)} (rerun with --traceback and please report it with the "
              "command line)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
