"""The `style-aligned` command: one module per command, the shared option groups in `options`."""

import argparse
from collections.abc import Callable, Sequence

from style_aligned.cli.app import add_app_command
from style_aligned.cli.batch import add_batch_command
from style_aligned.cli.convert import add_convert_command
from style_aligned.cli.evaluate import add_evaluate_command
from style_aligned.cli.generate import add_generate_command
from style_aligned.cli.panorama import add_panorama_command
from style_aligned.cli.sweep import add_sweep_command
from style_aligned.cli.transfer import add_transfer_command
from style_aligned.extras import MissingExtraError
from style_aligned.weights.safetensors_io import WeightsError

Command = Callable[[argparse.Namespace], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="style-aligned",
        description="Style-consistent image sets from Stable Diffusion by StyleAligned shared attention.",
    )
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    add_convert_command(subparsers.add_parser("convert", help="convert diffusers SD1/SDXL weights to Refiners weights"))
    add_generate_command(subparsers.add_parser("generate", help="generate a style-consistent set of images"))
    add_transfer_command(subparsers.add_parser("transfer", help="generate a set in the style of a real image"))
    add_panorama_command(
        subparsers.add_parser("panorama", help="generate a wide panorama in the style of a reference image")
    )
    add_evaluate_command(
        subparsers.add_parser("evaluate", help="score sets: CLIP text alignment and DINO set consistency")
    )
    add_sweep_command(subparsers.add_parser("sweep", help="generate a set per setting of a grid of options, and plot"))
    add_batch_command(subparsers.add_parser("batch", help="make the sets of a manifest, locally or on a Ray cluster"))
    add_app_command(subparsers.add_parser("app", help="a local web page to make sets, transfers and sweeps"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; errors in the user's inputs end it with a message and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        command(args)
    except (WeightsError, ValueError, FileNotFoundError, MissingExtraError) as error:
        parser.exit(2, f"style-aligned: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "style-aligned: interrupted (files already written are complete)\n")
