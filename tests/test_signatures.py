"""Public functions, methods and constructors with more than three parameters take the rest by keyword only."""

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import refiners.fluxion.layers as fl

import style_aligned

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    """Yield every public function, constructor and method that a module of the package defines."""
    for module_info in pkgutil.walk_packages(style_aligned.__path__, "style_aligned."):
        if module_info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                yield f"{module.__name__}.{name}", value
            elif inspect.isclass(value):
                if (
                    getattr(value.__init__, "__module__", None) == module.__name__
                ):  # a constructor inherited from Refiners keeps its own
                    yield f"{module.__name__}.{name}", value
                for method_name, method in vars(value).items():
                    if method_name.startswith("_") or not inspect.isfunction(method):
                        continue
                    if method_name == "forward" and issubclass(value, fl.Module):
                        continue  # a Fluxion layer receives its inputs positionally from the chain
                    yield f"{module.__name__}.{name}.{method_name}", method


def too_many_positional(function: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    parameters = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    named = [p for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    positional = [p for p in named if p.kind in POSITIONAL]
    return len(named) > 3 and len(positional) > 3


def test_parameters_past_the_third_are_keyword_only() -> None:
    offenders = sorted(name for name, function in public_callables() if too_many_positional(function))
    assert offenders == []


def test_the_check_sees_the_public_api() -> None:
    names = {name for name, _ in public_callables()}
    assert "style_aligned.pipeline.denoise.denoise_set" in names
    assert "style_aligned.pipeline.spec.SetSpec" in names
    assert not too_many_positional(style_aligned.generate_set)
    assert too_many_positional(lambda a, b, c, d: None)  # pyright: ignore[reportUnknownLambdaType]


MAX_FUNCTION_LINES = 80


def long_functions() -> list[str]:
    """The functions and methods of the package longer than `MAX_FUNCTION_LINES`, from `def` to the end, docstring
    included."""
    package = Path(style_aligned.__file__).parent
    found: list[str] = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines() -> None:
    assert long_functions() == []
