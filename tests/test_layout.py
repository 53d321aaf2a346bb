"""The layout the architecture rests on (STYLE.md habit 1), checked from the source: the kernel layer imports nothing
from zopro, the optimiser (``zopro``'s top level) nothing from the training program (``zopro.train``), no module
imports another that imports it back, and the benchmarks use public names only."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zokernels", "zopro")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, package: str):
    """``(module, imported name or None)`` of every import in the file, at any depth (function-level ones too)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield from ((base, alias.name) for alias in node.names)


def _edges(name: str) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` counts as ``a.b.c`` when that is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for module, member in _imports(path, package):
        target = f"{module}.{member}" if member and f"{module}.{member}" in MODULES else module
        if target in MODULES and target != name:
            found.add(target)
    return found


GRAPH = {name: _edges(name) for name in MODULES}


def test_kernels_import_nothing_from_zopro():
    bad = {m: sorted(e for e in edges if e.startswith("zopro")) for m, edges in GRAPH.items()
           if m.startswith("zokernels")}
    assert not {m: e for m, e in bad.items() if e}


def test_the_optimiser_imports_nothing_from_the_program():
    top = [m for m in MODULES if m.startswith("zopro") and not m.startswith("zopro.train")]
    assert set(top) >= {"zopro", "zopro.optim", "zopro.samplers", "zopro.seeds"}
    bad = {m: sorted(e for e in GRAPH[m] if e.startswith("zopro.train")) for m in top}
    assert not {m: e for m, e in bad.items() if e}


def test_no_import_circle():
    """Depth-first search for a back edge; the parent-package edge an import implies is left out (a package's
    ``__init__`` may import its own submodules)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for e in sorted(GRAPH[m]):
            if state.get(e) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(e):] + [e]))
            if e not in state:
                visit(e)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_importing_the_optimiser_loads_no_program_module():
    code = ("import sys, zopro, zopro.optim, zopro.samplers, zopro.seeds; "
            "print(sorted(m for m in sys.modules if m.startswith('zopro.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_benchmarks_import_public_names_of_zopro_only():
    """(``benchmarks/test_kernels.py`` reads ``zokernels._common.resolve_impl``: the kernel layer's to make public.)"""
    private = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for module, member in _imports(path, "benchmarks"):
            if module.split(".")[0] == "zopro" and any(p.startswith("_") for p in module.split(".") + [member or ""]):
                private.append(f"{path.name}: {module} {member}")
    assert not private
