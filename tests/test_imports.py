"""The package's imports: no cycles between its modules (lazy imports inside functions included), and the method's
layers stand on torch and Refiners alone."""

import ast
import graphlib
import sys
from pathlib import Path

import style_aligned

PACKAGE = Path(style_aligned.__file__).parent


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (`from a.b import c` gives `a.b.c`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that a file imports (`from a.b import c` imports `a.b.c` if it is a module, else `a.b`)."""
    names = imported_names(path)
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


def test_the_layers_import_only_torch_refiners_and_themselves() -> None:
    allowed = {"torch", "refiners", "jaxtyping", *sys.stdlib_module_names}
    for path in (PACKAGE / "layers").glob("*.py"):
        for name in imported_names(path):
            top = name.partition(".")[0]
            assert top in allowed or name.startswith("style_aligned.layers."), f"{path.name} imports {name}"


ALLOWED_PARTS = {  # docs/architecture.md: from the method up, each part imports only those before it
    "layers": set(),
    "options": set(),
    "extras": set(),
    "weights": {"options", "extras"},
    "adapters": {"layers", "options"},
    "pipeline": {"layers", "adapters", "options", "weights", "extras"},
    "evaluation": {"layers", "adapters", "options", "weights", "extras", "pipeline"},
    "batch": {"layers", "adapters", "options", "weights", "extras", "pipeline"},
    "cli": {"layers", "adapters", "options", "weights", "extras", "pipeline", "evaluation", "batch", "app"},
    "app": {"layers", "adapters", "options", "weights", "extras", "pipeline", "evaluation", "batch", "cli"},
}


def test_each_part_imports_only_the_parts_below_it() -> None:
    files = module_files()
    for module, path in files.items():
        if module == "style_aligned":
            continue
        part = module.split(".")[1]
        for imported in imported_modules(path, set(files)) - {"style_aligned"}:
            other = imported.split(".")[1]
            assert other == part or other in ALLOWED_PARTS[part], f"{module} ({part}) imports {imported} ({other})"
