"""`style-aligned convert`: diffusers weights to Refiners weights."""

import argparse
import sys
from pathlib import Path

from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL


def run_convert(args: argparse.Namespace) -> None:
    from style_aligned.weights.convert import convert
    from style_aligned.weights.families import flux_kind

    if flux_kind(args.source) is not None:
        return convert_flux(args)
    written = convert(
        args.source,
        args.destination,
        half=args.half,
        overwrite=args.overwrite,
        progress=lambda message: print(message, file=sys.stderr),
    )
    for path in written:
        print(path)


def convert_flux(args: argparse.Namespace) -> None:
    """Convert a FLUX.1 model (see `flux_kind`) into the converted layout of `flux_convert`, which `--model` loads."""
    import torch

    from style_aligned.weights.families import load_models
    from style_aligned.weights.flux_convert import save_flux

    dtype = torch.float16 if args.half else torch.bfloat16
    print(f"loading {args.source} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    models = load_models(args.source, dtype=dtype)
    assert not isinstance(models, StableDiffusion_1 | StableDiffusion_XL)
    for path in save_flux(models, args.destination, overwrite=args.overwrite, progress=_say):
        print(path)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def add_convert_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert an SD1 or SDXL pipeline to one Refiners .safetensors file per model: a diffusers folder (unet/,"
        " text_encoder/, [text_encoder_2/,] vae/; or a ControlNet), a single-file checkpoint in the original Stability"
        " layout, or a Hugging Face Hub repo id org/name[@revision]. Only safetensors weights are read. A FLUX.1"
        " model (a diffusers folder, Hub id or Black Forest Labs' transformer file) becomes a Refiners file per"
        " Refiners model, T5 as it is and flux.json, in bfloat16 (float16 with --half); --model loads the folder."
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
