"""The page's settings are the commands' own options.

Each setting on the page is made from an option of `generate`, `transfer` or `sweep`: its type, choices, default and
one-line help are read from the command's parser (the StyleAligned options' help comes from `StyleAlignedOptions`
through it), and the values on the page become that command's arguments, so a set made from the page is the set the
command makes with the same options. Showing one more option is one more name in `SET_CONTROLS`.
"""

import argparse
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from style_aligned.options import StyleAlignedOptions

Command = Literal["generate", "transfer", "sweep"]
Kind = Literal["text", "int", "float", "choice", "switch", "choices", "list"]

SET_CONTROLS: tuple[str, ...] = ("negative_prompt", "seed", "steps", "guidance", "size", "chunk_size")
"""The set options on the page, by the destination of their flag (`--chunk-size` is `chunk_size`)."""
STYLE_CONTROLS: tuple[str, ...] = StyleAlignedOptions.names()
"""The StyleAligned options on the page: all of them."""
TRANSFER_CONTROLS: tuple[str, ...] = ("captions", "fit", "offset", "inversion_guidance")
"""The options of a reference image on the page."""
SWITCH = {"default": None, "on": True, "off": False}
"""The values of an on/off option whose default is left to the command or the model."""


@functools.cache
def command_parser(command: Command) -> argparse.ArgumentParser:
    """The parser of a `style-aligned` command."""
    from style_aligned.cli.generate import add_generate_command
    from style_aligned.cli.sweep import add_sweep_command
    from style_aligned.cli.transfer import add_transfer_command

    adders = {"generate": add_generate_command, "transfer": add_transfer_command, "sweep": add_sweep_command}
    parser = argparse.ArgumentParser(prog=f"style-aligned {command}")
    adders[command](parser)
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    actions: list[argparse.Action] = parser._actions  # pyright: ignore[reportPrivateUsage] (argparse lists them nowhere else)
    return {action.dest: action for action in actions if action.option_strings}


@dataclass(frozen=True, kw_only=True)
class Control:
    """One setting on the page, made from a command's option.

    Attributes:
        name: The option's destination (`chunk_size` for `--chunk-size`).
        label: The option as words.
        help: Its one-line help.
        kind: How the page asks for it: `text`, `int`, `float`, `choice` (one of `choices`), `switch` (default, on or
            off), `choices` (some of `choices`) or `list` (values separated by commas).
        default: Its default in the command.
        choices: The values of a `choice` or `choices` option.
        convert: The command's conversion of one value from text.
    """

    name: str
    label: str
    help: str
    kind: Kind
    default: Any
    choices: tuple[str, ...] = ()
    convert: Callable[[str], Any] = str

    def parse(self, value: Any) -> Any:
        """The command's value for what the page holds (an empty field is the command's default).

        Raises:
            ValueError: Naming the setting, if the value does not fit it.
        """
        try:
            return self._parse(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
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


def _kind(action: argparse.Action) -> Kind:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch"
    many = action.nargs in ("+", "*")
    if action.choices is not None:
        return "choices" if many else "choice"
    if many:
        return "list"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    return "text"


@functools.cache
def control(command: Command, name: str) -> Control:
    """The page's setting for an option of a command.

    Raises:
        KeyError: If the command has no such option.
    """
    parser = command_parser(command)
    action = _actions(parser)[name]
    kind = _kind(action)
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    return Control(
        name=name,
        label=name.replace("_", " "),
        help=(action.help or "").replace("%%", "%"),
        kind=kind,
        default=parser.get_default(name),
        choices=tuple(str(choice) for choice in action.choices or ()),
        convert=convert,
    )


def prompt_lines(text: str | None) -> list[str]:
    """The prompts of a text field, one per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def command_args(command: Command, values: Mapping[str, Any], **given: Any) -> argparse.Namespace:
    """The arguments of a command for the values on the page.

    Args:
        command: The command.
        values: The page's value of each setting, by option name; settings the command lacks are left out.
        given: Arguments set as they are (prompts, the model, output paths).

    Returns:
        The command's defaults, with the page's values and `given` in their place.

    Raises:
        ValueError: Naming the setting, if a value does not fit it.
    """
    parser = command_parser(command)
    options = _actions(parser)
    args = argparse.Namespace(**{name: parser.get_default(name) for name in options})
    for name, value in values.items():
        if name in options:
            setattr(args, name, control(command, name).parse(value))
    for name, value in given.items():
        setattr(args, name, value)
    return args


def lora_arguments(text: str | None, folder: Path | None) -> list[str]:
    """The `--lora` arguments of the page's LoRA field: one `NAME[:SCALE]` per line.

    NAME is a file in `folder` (resolved inside the LoRA folder given on the command line: the page cannot name any
    other local file) or a file on the Hugging Face Hub, `org/name[@revision]/path/in/repo.safetensors`, fetched into
    the Hub cache when the set is made.

    Raises:
        ValueError: If a line names neither a LoRA file of the folder nor a Hub file, or its scale is not a number.
    """
    from style_aligned.weights.hub import parse_file_id

    arguments: list[str] = []
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
                arguments.append(f"{path}:{factor:g}")
                continue
        if parse_file_id(name) is not None and name.endswith(".safetensors"):
            arguments.append(f"{name}:{factor:g}")
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
