"""The package's imports, lazy imports inside functions included: no cycles between its modules, each part imports
only the parts below it, and the method's layers stand on torch and Refiners alone."""

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


def package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports (a package's own modules left out of its
    `__init__`, which re-exports them)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported = imported_modules(path, set(files)) - {module}
        if path.name == "__init__.py":
            imported = {name for name in imported if not name.startswith(f"{module}.")}
        graph[module] = imported
    return graph


def test_no_import_cycles() -> None:
    graph = package_imports()
    for module, imported in graph.items():
        assert "style_aligned" not in imported, f"{module} imports the top-level package (which imports everything)"
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    assert len(graph) > 50


def test_the_layers_import_only_torch_refiners_and_themselves() -> None:
    allowed = {"torch", "refiners", "jaxtyping", *sys.stdlib_module_names}
    for path in (PACKAGE / "layers").glob("*.py"):
        for name in imported_names(path):
            top = name.partition(".")[0]
            assert top in allowed or name.startswith("style_aligned.layers."), f"{path.name} imports {name}"


def test_the_flux_models_import_only_torch_refiners_numpy_and_extras() -> None:
    allowed = {"torch", "refiners", "jaxtyping", "numpy", *sys.stdlib_module_names}
    for path in (PACKAGE / "flux").glob("*.py"):
        for name in imported_names(path):
            top = name.partition(".")[0]
            inside = name.startswith(("style_aligned.flux.", "style_aligned.extras."))
            assert top in allowed or inside, f"{path.name} imports {name}"


RANKS = {  # docs/architecture.md, from the method up: a part imports only parts of lower rank
    "layers": 0,
    "options": 0,
    "extras": 0,
    "flux": 1,
    "weights": 2,
    "adapters": 2,
    "pipeline": 3,
    "evaluation": 4,
    "batch": 4,
    "app": 5,
    "cli": 6,  # the `app` command starts the app
}


def test_each_part_imports_only_the_parts_below_it() -> None:
    for module, imported in package_imports().items():
        if module == "style_aligned":
            continue
        part = module.split(".")[1]
        for name in imported:
            other = name.split(".")[1]
            allowed = other == part or RANKS[other] < RANKS[part]
            assert allowed, f"{module} ({part}) imports {name} ({other})"


def test_the_app_and_the_command_line_stand_apart() -> None:
    """The app and the command line both read their specs with `pipeline.spec_fields`: no module of the app imports
    the command line, and of the command line only the `app` command (which starts the page) imports the app."""
    graph = package_imports()
    for module, imported in graph.items():
        into = {name.split(".")[1] for name in imported if name != "style_aligned"}
        if module.startswith("style_aligned.app"):
            assert "cli" not in into, f"{module} imports the command line"
        elif module.startswith("style_aligned.cli") and module != "style_aligned.cli.app":
            assert "app" not in into, f"{module} imports the app"
    assert any(name.startswith("style_aligned.app") for name in graph["style_aligned.cli.app"])
