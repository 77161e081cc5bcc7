"""The page's settings are the fields of the specs.

Each setting on the page is a field of `SetSpec` or `TransferSpec`, or a StyleAligned option: its type, choices,
default and one-line help are read from the field (see `spec_fields`), and the values on the page become the values of
the spec's fields, read by `read_spec` as the command line's options and a manifest's lines are, so a set made from
the page is the set the command makes with the same options. Showing one more field is one more name in
`SET_CONTROLS`.
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from style_aligned.options import OptionField, StyleAlignedOptions, option_fields
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.spec_fields import parse_size, spec_fields
from style_aligned.pipeline.transfer import TransferSpec

Command = Literal["generate", "transfer", "sweep"]
Kind = Literal["text", "int", "float", "slider", "choice", "switch", "choices", "list"]

SPECS: dict[Command, type[SetSpec]] = {"generate": SetSpec, "transfer": TransferSpec, "sweep": SetSpec}
"""The spec each kind of job makes."""
SET_CONTROLS: tuple[str, ...] = ("negative_prompt", "seed", "steps", "guidance", "size", "chunk_size")
"""The set's settings on the page: fields of `SetSpec`, and `size` (`WxH`, the width and the height)."""
STYLE_CONTROLS: tuple[str, ...] = StyleAlignedOptions.names()
"""The StyleAligned options on the page: all of them."""
TRANSFER_CONTROLS: tuple[str, ...] = ("captions", "fit", "offset", "inversion_guidance")
"""The settings of a reference image on the page: its caption, and fields of `TransferSpec`."""
SWITCH = {"default": None, "on": True, "off": False}
"""The values of an on/off option whose default is left to the spec or the model."""


@dataclass(frozen=True, kw_only=True)
class Control:
    """One setting on the page, made from a field of a spec or a StyleAligned option.

    Attributes:
        name: The field's name (or the page's own: `size`, `captions`).
        label: The name as words.
        help: Its one-line help.
        kind: How the page asks for it: `text`, `int`, `float`, `slider` (a number in `bounds`), `choice` (one of
            `choices`), `switch` (default, on or off), `choices` (some of `choices`) or `list` (values separated by
            commas).
        default: Its default in the spec (`None`: left to the spec or the model).
        choices: The values of a `choice` or `choices` option.
        convert: The conversion of one value from text.
        bounds: The range of a `slider`.
        initial: Where a `slider` starts: the field's default; left there, the setting is left to the spec (`default`),
            so that a sweep may vary it.
    """

    name: str
    label: str
    help: str
    kind: Kind
    default: Any
    choices: tuple[str, ...] = ()
    convert: Callable[[str], Any] = str
    bounds: tuple[float, float] | None = None
    initial: float | None = None

    def parse(self, value: Any) -> Any:
        """The field's value for what the page holds (an empty field is the default).

        Raises:
            ValueError: Naming the setting, if the value does not fit it.
        """
        try:
            return self._parse(value)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.label}: {error}") from None

    def _parse(self, value: Any) -> Any:
        if value is None or value == "" or value == []:
            return self.default
        if self.kind == "switch":
            if value not in SWITCH:
                raise ValueError(f"choose one of {', '.join(SWITCH)}, got {value!r}")
            return SWITCH[value]
        if self.kind in ("int", "float"):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number, got {value!r}")
            if self.kind == "int" and number != int(number):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(number) if self.kind == "int" else number
        if self.kind == "slider" and self.bounds is not None:
            number, (low, high) = float(value), self.bounds
            if not low <= number <= high:
                raise ValueError(f"expected a number in [{low:g}, {high:g}], got {value!r}")
            return self.default if number == self.initial else number
        if self.kind == "choices":
            values = [str(item) for item in value]
            if unknown := [item for item in values if item not in self.choices]:
                raise ValueError(f"unknown {', '.join(unknown)}: choose among {', '.join(self.choices)}")
            return [self.convert(item) for item in values]
        if self.kind == "list":
            items = [item for item in str(value).replace(",", " ").split() if item]
            return [self.convert(item) for item in items] or self.default
        text = str(value).strip()
        if not text:
            return self.default
        if self.kind == "choice" and text not in self.choices:
            raise ValueError(f"choose one of {', '.join(self.choices)}, got {text!r}")
        return self.convert(text)


def _kind(option: OptionField) -> Kind:
    if option.bounds is not None and option.kind is float and not option.many:
        return "slider"
    if option.kind is bool:
        return "switch"
    if option.choices is not None:
        return "choices" if option.many else "choice"
    if option.many:
        return "list"
    if option.kind is int:
        return "int"
    if option.kind is float:
        return "float"
    return "text"


PAGE_CONTROLS = {
    "size": Control(
        name="size",
        label="size",
        help="WxH in pixels, multiples of 8 (default: 1024 SDXL, 512 SD1)",
        kind="text",
        default=None,
        convert=parse_size,
    ),
    "captions": Control(
        name="captions",
        label="captions",
        help="a caption of the reference image (its prompt)",
        kind="text",
        default=None,
    ),
}
"""The settings that are no field as they are: the size (the width and the height) and the reference's caption."""


@functools.cache
def control(command: Command, name: str) -> Control:
    """The page's setting for a field of the command's spec, a StyleAligned option (its default left to the spec) or
    one of `PAGE_CONTROLS`.

    Raises:
        KeyError: If there is no such setting.
    """
    if name in PAGE_CONTROLS:
        return PAGE_CONTROLS[name]
    styles = {option.name: option for option in option_fields()}
    option = styles[name] if name in styles else spec_fields(SPECS[command])[name]
    kind = _kind(option)
    return Control(
        name=name,
        label=name.replace("_", " "),
        help=option.help,
        kind=kind,
        default=None if name in styles else option.default,
        choices=option.choices or (),
        convert=option.kind if kind in ("list", "text") and option.kind in (int, float, str) else str,
        bounds=option.bounds,
        initial=option.default if kind == "slider" else None,
    )


def prompt_lines(text: str | None) -> list[str]:
    """The prompts of a text field, one per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def spec_values(command: Command, values: Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """The values of the command's spec fields for the values on the page (see `read_spec`).

    Args:
        command: The job.
        values: The page's value of each setting, by name; settings that are no field of the command's spec (nor the
            size or a StyleAligned option) are left out, and so are empty ones (they take the spec's defaults).
        given: Values of fields set as they are (the prompts, the references, the LoRAs).

    Raises:
        ValueError: Naming the setting, if a value does not fit it.
    """
    fields = spec_fields(SPECS[command])
    spec: dict[str, Any] = {}
    style: dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields and name not in STYLE_CONTROLS and name != "size":
            continue
        parsed = control(command, name).parse(value)
        if parsed is None:
            continue
        if name == "size":
            spec["width"], spec["height"] = parsed
        elif name in STYLE_CONTROLS:
            style[name] = parsed
        else:
            spec[name] = parsed
    return spec | ({"style": style} if style else {}) | given


def lora_values(text: str | None, folder: Path | None) -> list[dict[str, Any]]:
    """The LoRAs of the page's LoRA field (values of `LoraSpec`): one `NAME[:SCALE]` per line.

    NAME is a file in `folder` (resolved inside the LoRA folder given on the command line: the page cannot name any
    other local file) or a file on the Hugging Face Hub, `org/name[@revision]/path/in/repo.safetensors`, fetched into
    the Hub cache when the set is made.

    Raises:
        ValueError: If a line names neither a LoRA file of the folder nor a Hub file, or its scale is not a number.
    """
    from style_aligned.weights.hub import parse_file_id

    arguments: list[dict[str, Any]] = []
    for line in prompt_lines(text):
        name, separator, scale = line.rpartition(":")
        if not separator:
            name, scale = line, ""
        name = name.strip()
        try:
            factor = float(scale) if scale else 1.0
        except ValueError:
            raise ValueError(f"LoRA {line!r}: the scale after ':' must be a number") from None
        if folder is not None:
            root = folder.resolve()
            path = (root / name).resolve()
            if path.is_relative_to(root) and path.is_file():
                arguments.append({"path": str(path), "scale": factor})
                continue
        if parse_file_id(name) is not None and name.endswith(".safetensors"):
            arguments.append({"path": name, "scale": factor})
            continue
        files = (
            f"a file in the LoRA folder ({', '.join(loras(folder))})" if folder is not None else "a file in --lora-dir"
        )
        raise ValueError(f"LoRA {name!r} is neither {files} nor a Hub file org/name/path.safetensors")
    return arguments


def loras(folder: Path | None) -> Sequence[str]:
    """The LoRA files (`.safetensors`) the page may use, by name."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.safetensors") if path.is_file())
