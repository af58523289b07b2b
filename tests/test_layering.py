"""The package's shape: no import cycle (function-local imports included), data/ a leaf,
no module named by size ("util"). Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package name -> its folder (cli/ installs as marsseg.cli)
FOLDERS = {"marsseg": ROOT / "marsseg", "marsseg.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """Every module of marsseg (and marsseg.cli): dotted name -> file."""
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The marsseg modules `name` imports anywhere in its file (top level or in a function).

    Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so the edge goes to both (but not
    to the importer's own packages: they are initialised before it runs).
    """
    own = _ancestors(name)
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(name, path).split(".")
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            found = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in found:
            while t and t not in known:
                t = t.rpartition(".")[0]
            while t:
                if t != name and t in known and t not in own:
                    targets.add(t)
                t = t.rpartition(".")[0]
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports(n, p, known) for n, p in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `g` as [a, b, ..., a], else None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_local_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "marsseg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    monkeypatch.setitem(FOLDERS, "marsseg", pkg)
    monkeypatch.setitem(FOLDERS, "marsseg.cli", tmp_path / "none")
    assert find_cycle(graph()) == ["marsseg.a", "marsseg.b", "marsseg.a"]


def test_data_is_a_leaf():
    """data/ imports nothing of marsseg but the package root, errors and the private helpers."""
    allowed = {"marsseg", "marsseg.errors", "marsseg._io", "marsseg._lock", "marsseg._progress"}
    for name, deps in graph().items():
        if name.startswith("marsseg.data"):
            outside = {d for d in deps if not d.startswith("marsseg.data")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def test_no_module_named_util():
    bad = [str(p) for p in modules().values() if "util" in p.stem.lower()]
    assert not bad, f"modules named by size, not concept: {bad}"


def test_library_does_not_import_the_cli():
    for name, deps in graph().items():
        if not name.startswith("marsseg.cli"):
            assert not any(d.startswith("marsseg.cli") for d in deps), name
    assert _ancestors("marsseg.data.shards") == {"marsseg", "marsseg.data"}
