"""The one way from plain values to a spec: the command line's options, the app's form and a manifest line all become
a mapping of JSON-like values (strings, numbers, booleans, lists, objects for the ControlNets, LoRAs and IP-Adapter,
paths as strings) that `read_spec` checks against the fields of `SetSpec`, `TransferSpec` or `PanoramaSpec` and turns
into the spec.

Each spec field carries its one-line help (see `style_aligned.options.setting`) and its default, so that the front
ends derive their flags, labels, choices and defaults from the fields (`spec_fields`), and every default lives in the
spec's dataclass.
"""

import dataclasses
import json
import math
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin

from PIL import Image

from style_aligned.options import OptionField, StyleAlignedOptions, describe_fields

Spec = TypeVar("Spec")


def spec_fields(spec_type: type[Any]) -> dict[str, OptionField]:
    """The fields of a spec by name, with their help, types, choices and defaults (see `describe_fields`)."""
    return {option.name: option for option in describe_fields(spec_type)}


def parse_size(text: str) -> tuple[int, int]:
    """Parse an image size given as `WxH` (or `N` for a square) into (width, height), as the front ends take it.

    Raises:
        ValueError: If the text is not a size.
    """
    try:
        width, _, height = text.strip().lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT in pixels, e.g. 1024x1024, got {text!r}") from None


def read_spec(
    spec_type: type[Spec], values: Mapping[str, Any], *, base: Path | None = None, leave_out: Collection[str] = ()
) -> Spec:
    """Read a spec from plain values: each value is checked against its field's type and converted (paths from
    strings, ControlNets, LoRAs and IP-Adapters from objects, `style` from an object of changes to the spec's
    default StyleAligned options); fields not given take the dataclass's defaults.

    Args:
        spec_type: The spec's dataclass.
        values: The given fields, by name.
        base: The folder relative paths are taken from (none: paths are kept as given).
        leave_out: Fields that may not be given.

    Raises:
        ValueError: Naming the field, if a name is unknown, a required field is missing or a value does not fit.
    """
    fields = {name: option for name, option in spec_fields(spec_type).items() if name not in leave_out}
    if unknown := [name for name in values if name not in fields]:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    if missing := [option for name, option in fields.items() if option.required and name not in values]:
        raise ValueError(f"missing field {missing[0].name!r} ({missing[0].help})")
    hints = typing.get_type_hints(spec_type)
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name == "style":
            converted[name] = read_style(value, default=fields[name].default)
        else:
            converted[name] = convert(value, hints[name], name, base=base)
    return spec_type(**converted)


def read_style(value: object, *, default: StyleAlignedOptions) -> StyleAlignedOptions:
    """Read a `style` object: changes to the spec's default options (a transfer's are the transfer example's).

    Raises:
        ValueError: Naming the option, if one is unknown or its value does not fit.
    """
    if not isinstance(value, dict):
        raise ValueError(f"style must be an object of StyleAlignedOptions, got {json.dumps(value)}")
    changes = cast(dict[str, Any], value)
    hints = typing.get_type_hints(StyleAlignedOptions)
    converted = {
        name: convert(v, hints[name], f"style.{name}", base=None) if name in hints else v for name, v in changes.items()
    }
    return StyleAlignedOptions.from_dict({**default.to_dict(), **converted})


def convert(value: object, annotation: Any, where: str, *, base: Path | None) -> Any:
    """Check a plain value against a field's type and convert it (relative paths are taken from `base`, if given).

    Raises:
        ValueError: Naming the field and what it takes.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None) and arg is not Image.Image]
        if value is None and type(None) in args:
            return None
        if Path in options:  # str | Path: a path
            return convert(value, Path, where, base=base)
        if len(options) == 1:
            return convert(value, options[0], where, base=base)
        raise TypeError(f"{where}: a field of type {annotation} cannot be read from plain values")
    if annotation is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ValueError(f"{where} must be a path, got {_shown(value)}")
        path = Path(value).expanduser()
        return path if base is None else (base / path).absolute()
    if annotation in (bool, int, float, str):
        return _scalar(value, annotation, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(json.dumps, args))}, got {_shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {_shown(value)}")
        items = [
            convert(item, args[0], f"{where}[{index}]", base=base) for index, item in enumerate(list(cast(Any, value)))
        ]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return convert_dataclass(value, annotation, where, base=base)
    raise TypeError(f"{where}: a field of type {annotation} cannot be read from plain values")


def _scalar(value: object, annotation: type, where: str) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {_shown(value)}")
        return value
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be a whole number, got {_shown(value)}")
        return value
    if annotation is float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{where} must be a number, got {_shown(value)}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    return json.dumps(value, default=str)


def convert_dataclass(value: object, annotation: type[Any], where: str, *, base: Path | None) -> Any:
    """Read an object into a dataclass (a ControlNet, a LoRA, an IP-Adapter), naming unknown and missing fields.

    Raises:
        ValueError: Naming the field.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {_shown(value)}")
    given = cast(dict[str, Any], value)
    fields = {f.name: f for f in dataclasses.fields(annotation)}
    if unknown := [name for name in given if name not in fields]:
        raise ValueError(f"unknown field {where}.{unknown[0]} (fields: {', '.join(fields)})")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing := [name for name in required if name not in given]:
        raise ValueError(f"missing field {where}.{missing[0]}")
    hints = typing.get_type_hints(annotation)
    return annotation(
        **{name: convert(item, hints[name], f"{where}.{name}", base=base) for name, item in given.items()}
    )
