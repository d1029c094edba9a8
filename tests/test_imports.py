"""Module hygiene of `molfun_jax/` and `convert/`: every module imports alone in a fresh
interpreter, the import graph (every `import` statement, also the ones inside functions) has no
cycle, and no `_private` name is imported from another module."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from tests.conftest import ROOT

PACKAGES = ("molfun_jax", "convert")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of each import statement of a module; relative
    imports resolved; `from pkg import sub` counts as an import of `pkg.sub` when it is a module."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, []) if sub in MODULES else (base, [a.name]))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own submodules imported by its
    `__init__` count; a submodule's implicit import of its parent package does not)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for mod, _ in imports_of(name, path):
            while mod and mod not in MODULES:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):
                deps.add(mod)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (scipy), each sorted."""
    names = sorted(graph)
    index = {n: i for i, n in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    m = csr_matrix(([1] * len(rows), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(m, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for n, lab in zip(names, labels):
        groups.setdefault(int(lab), []).append(n)
    return sorted(g for g in groups.values() if len(g) > 1)


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (modules that import each other, directly or not): " + \
        "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_imported_across_modules():
    bad = [f"{name} imports {n} from {mod}" for name, path in MODULES.items()
           for mod, names in imports_of(name, path) for n in names
           if n.startswith("_") and not n.startswith("__") and mod != name]
    assert not bad, "\n".join(bad)


def test_the_library_does_not_import_the_convert_package():
    bad = sorted(n for n, deps in import_graph().items() if n.startswith("molfun_jax")
                 and any(d.split(".")[0] == "convert" for d in deps))
    assert not bad, f"molfun_jax modules importing the top-level convert package: {bad}"


ALONE = """
import importlib, json, sys, traceback
failed = {}
for m in sys.argv[1:]:
    for k in [k for k in sys.modules if k.split(".")[0] in ("molfun_jax", "convert", "tests")]:
        del sys.modules[k]  # each project module imported as the first one (third-party ones stay loaded)
    try:
        importlib.import_module(m)
    except Exception:
        failed[m] = traceback.format_exc(limit=-4)
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    """Each module imported first, with no project module loaded (in a fresh interpreter): an
    import cycle that breaks at import time, or a missing import, fails here."""
    r = subprocess.run([sys.executable, "-c", ALONE, *sorted(MODULES)], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
                            "HOME": str(Path.home())}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{m}:\n{tb}" for m, tb in failed.items())
