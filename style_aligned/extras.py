"""Optional dependencies: a missing extra is reported with the command that installs it."""

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency of a feature is not installed."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Only the absence of `module` itself is reported this way: any other import error (a broken install, a missing
    dependency of `module`) keeps its own traceback.

    Args:
        module: The module to import, e.g. `"transformers"` or `"matplotlib.figure"`.
        extra: The extra of style-aligned that installs it, e.g. `"eval"`.
        feature: What needs it, e.g. `"evaluate"`.

    Raises:
        MissingExtraError: If the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        if error.name is None or error.name.partition(".")[0] != top:
            raise
        raise MissingExtraError(
            f"{feature} needs {top}, which is not installed: pip install 'style-aligned[{extra}]'"
        ) from None
