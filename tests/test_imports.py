"""The modules of the package import one another without cycles, lazy imports inside functions included."""

import ast
import graphlib
from pathlib import Path

import style_aligned

PACKAGE = Path(style_aligned.__file__).parent


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that a file imports (`from a.b import c` imports `a.b.c` if it is a module, else `a.b`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    found: set[str] = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def test_no_import_cycles() -> None:
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported = imported_modules(path, set(files)) - {module}
        if path.name == "__init__.py":  # a package re-exports its own modules
            imported = {name for name in imported if not name.startswith(f"{module}.")}
        assert "style_aligned" not in imported, f"{module} imports the top-level package (which imports everything)"
        graph[module] = imported
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    assert len(graph) > 50
