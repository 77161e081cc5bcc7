"""`style-aligned convert`: diffusers weights to Refiners weights."""

import argparse
import sys
from pathlib import Path


def run_convert(args: argparse.Namespace) -> None:
    from style_aligned.weights.convert import convert

    written = convert(
        args.source,
        args.destination,
        half=args.half,
        overwrite=args.overwrite,
        progress=lambda message: print(message, file=sys.stderr),
    )
    for path in written:
        print(path)


def add_convert_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert an SD1 or SDXL pipeline to one Refiners .safetensors file per model: a diffusers folder (unet/,"
        " text_encoder/, [text_encoder_2/,] vae/; or a ControlNet), a single-file checkpoint in the original Stability"
        " layout, or a Hugging Face Hub repo id org/name[@revision]. Only safetensors weights are read."
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SRC",
        help="diffusers folder, single .safetensors checkpoint, or Hub repo id org/name[@revision]",
    )
    parser.add_argument("--to", dest="destination", type=Path, required=True, metavar="DST_DIR", help="output folder")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in DST_DIR")
    parser.set_defaults(command=run_convert)
