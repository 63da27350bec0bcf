"""The project's import rules, checked on the source (a lint rule that runs in CI).

- No import cycle among regroup's modules (imports inside functions count; imports under
  ``if TYPE_CHECKING:`` do not, nor does Python's implicit import of a parent package).
- The core never imports the adapters.
- No ``from module import _private`` across modules, and no import of a private module
  (``_name.py``) from outside the package that holds it; tests may reach private helpers.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it is installed as (pyproject's package-dir).
PACKAGES = {"regroup": "regroup", "adapters": "regroup.adapters"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(name: str | None, path: Path):
    """Yield ``(lineno, imported module, imported names)`` of a file (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = (name if _is_package(name) else name.rpartition(".")[0]) if name else ""
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, [a.name for a in node.names]


def _targets(module: str, names: list[str]) -> list[str]:
    """The regroup modules an import statement loads (a submodule named in ``from
    package import name`` counts as itself, other names as the package)."""
    out = []
    if module in MODULES:
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out += subs
        if len(subs) < len(names) or not names:
            out.append(module)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for _, module, names in _imports(name, path):
            graph[name].update(t for t in _targets(module, names) if t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _private_parent(module: str) -> str | None:
    """The package a private module belongs to (None for a public module)."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not p.startswith("__"):
            return ".".join(parts[:i])
    return None


def _violations(files: dict[str, Path], root: Path = ROOT) -> list[str]:
    bad = []
    for name, path in files.items():
        here = name
        for line, module, names in _imports(name if name in MODULES else None, path):
            where = f"{path.relative_to(root)}:{line}"
            if not module.startswith("regroup"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{where}: imports private name {n!r} from {module}")
                sub = f"{module}.{n}"
                owner = _private_parent(sub) if sub in MODULES else None
                if owner is not None and not (here + ".").startswith(owner + "."):
                    bad.append(f"{where}: imports private module {sub} from outside {owner}")
            owner = _private_parent(module)
            if owner is not None and not (here + ".").startswith(owner + "."):
                bad.append(f"{where}: imports private module {module} from outside {owner}")
    return bad


def test_the_module_graph_is_what_the_rules_read():
    # The rules below are only as good as the graph: it must see real edges.
    graph = _graph()
    assert "regroup.engine" in graph["regroup.pipeline"]
    assert "regroup.partitioners.registry" in graph["regroup.partitioners.metis"]
    assert "regroup.pipeline" in graph["regroup"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    fake = {"x": {"y"}, "y": set()}
    assert _cycles(fake) == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_core_never_imports_the_adapters():
    graph = _graph()
    core = [m for m in graph if not m.startswith("regroup.adapters")]
    assert [(m, t) for m in core for t in graph[m] if t.startswith("regroup.adapters")] == []


@pytest.mark.parametrize("folder", ["regroup", "adapters", "benchmarks"])
def test_no_private_import_across_modules(folder):
    if folder == "benchmarks":
        files = {f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    else:
        files = {n: p for n, p in MODULES.items()
                 if p.is_relative_to(ROOT / folder)}
    assert _violations(files) == []


def test_the_private_import_rule_catches_what_it_should(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("from regroup.result import _add\nfrom regroup.partitioners._isolate import x\n"
                 "from regroup.partitioners import _panels\n")
    bad = _violations({"probe": f}, tmp_path)
    assert len(bad) == 4 and "private name '_add'" in bad[0]
    assert "private module regroup.partitioners._isolate" in bad[1]
    assert "private name '_panels'" in bad[2]
    assert "private module regroup.partitioners._panels" in bad[3]
