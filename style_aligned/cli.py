"""The `style-aligned` command."""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from style_aligned.safetensors_io import WeightsError

Command = Callable[[argparse.Namespace], None]


def _convert(args: argparse.Namespace) -> None:
    from style_aligned.convert import convert

    written = convert(
        args.source,
        args.destination,
        half=args.half,
        overwrite=args.overwrite,
        progress=lambda message: print(message, file=sys.stderr),
    )
    for path in written:
        print(path)


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert a diffusers folder (an SD1 or SDXL pipeline with unet/, text_encoder/, [text_encoder_2/,] vae/;"
        " or a ControlNet) to one Refiners .safetensors file per model. Only safetensors weights are read."
    )
    parser.add_argument("--from", dest="source", type=Path, required=True, metavar="SRC_DIR", help="diffusers folder")
    parser.add_argument("--to", dest="destination", type=Path, required=True, metavar="DST_DIR", help="output folder")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in DST_DIR")
    parser.set_defaults(command=_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="style-aligned",
        description="Style-consistent image sets from Stable Diffusion by StyleAligned shared attention.",
    )
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_convert(subparsers.add_parser("convert", help="convert diffusers SD1/SDXL weights to Refiners weights"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; errors in the user's inputs end it with a message and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        command(args)
    except WeightsError as error:
        parser.exit(2, f"style-aligned: error: {error}\n")


if __name__ == "__main__":
    main()
