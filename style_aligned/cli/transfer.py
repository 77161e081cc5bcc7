"""`style-aligned transfer`: a set in the style of a real image."""

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from style_aligned.cli.options import (
    add_extras_options,
    add_model_options,
    add_set_options,
    add_style_options,
    check_files,
    check_out,
    extras,
    load_model,
    style_options,
    write_set,
)
from style_aligned.options import StyleAlignedOptions

if TYPE_CHECKING:
    from PIL import Image

    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.transfer import TransferSpec


def transfer_spec(args: argparse.Namespace, trajectory: "ReferenceTrajectory | None" = None) -> "TransferSpec":
    """The set that `transfer` makes from its options; size and steps default to those of a reused inversion.

    Everything that can be checked without the model is checked.

    Raises:
        ValueError: If an option is out of range, or the solver is not the inversion's.
    """
    from style_aligned.pipeline.transfer import TransferSpec, check_transfer_solver

    check_transfer_solver(args.solver, args.timestep_spacing)
    width, height = args.size or ((trajectory.width, trajectory.height) if trajectory else (None, None))
    steps = args.steps or (len(trajectory.timesteps) if trajectory else 50)
    spec = TransferSpec(
        prompts=args.prompts,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=steps,
        guidance=args.guidance,
        solver=args.solver,
        timestep_spacing=args.timestep_spacing,
        width=width,
        height=height,
        chunk_size=args.chunk_size,
        style=StyleAlignedOptions.for_transfer().replace(**style_options(args)),
        offset=args.offset,
        inversion_guidance=args.inversion_guidance,
        fit=args.fit,
        **extras(args),
    )
    spec.check()
    return spec


def transfer_details(args: argparse.Namespace, trajectory: "ReferenceTrajectory") -> dict[str, Any]:
    """What a transfer set's sidecar adds to its settings: the model, the image, its caption and its inversion."""
    return {
        "model": str(args.model),
        "image": str(args.image) if args.image else None,
        "caption": trajectory.caption,
        "trajectory": str(args.trajectory or args.save_trajectory or "") or None,
    }


def read_image(path: Path) -> "Image.Image":
    """Read a reference image.

    Raises:
        ValueError: If Pillow cannot read it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read the reference image {path}: {error}") from None
    return image


def run_transfer(args: argparse.Namespace) -> None:
    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.set_files import set_title, sidecar
    from style_aligned.pipeline.transfer import make_trajectory, transfer_set

    if args.trajectory is None and (args.image is None or args.caption is None):
        raise ValueError("give the reference as --image and --caption, or reuse an inversion with --trajectory")
    trajectory = ReferenceTrajectory.load(args.trajectory) if args.trajectory else None
    spec = transfer_spec(args, trajectory)
    image_path: Path | None = args.image
    if trajectory is None and image_path is not None and not image_path.is_file():
        raise FileNotFoundError(f"the reference image {image_path} does not exist")
    image = read_image(args.image) if trajectory is None else None  # checked before the model is loaded
    check_out(args.out, args.overwrite)
    check_files(args)
    sd = load_model(args)
    spec = spec.resolved(sd)
    if trajectory is None:
        assert image is not None
        print(f"inverting {args.image} ({spec.steps} DDIM steps)", file=sys.stderr)
        trajectory = make_trajectory(sd, image, args.caption, spec)
        if args.save_trajectory:
            trajectory.save(args.save_trajectory)
            print(f"saved the inversion to {args.save_trajectory}", file=sys.stderr)
    prompts = [trajectory.caption, *spec.prompts]
    reference = trajectory
    write_set(
        args.out,
        lambda bar: transfer_set(sd, reference, spec, progress=bar),
        sidecar("transfer", spec, prompts, **transfer_details(args, trajectory)),
        title=set_title("transfer", spec.seed),
        overwrite=args.overwrite,
    )


def add_transfer_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate a set in the style of a real image: the image is inverted with DDIM under its caption, and its"
        " trajectory becomes the reference of the set (image 0, the reconstructed input). Defaults follow the"
        " reference implementation's transfer example: shared GroupNorm, shift log 2, guidance 10, offset 5."
    )
    add_model_options(parser)
    add_set_options(parser)
    parser.set_defaults(steps=None)
    group = parser.add_argument_group("reference image")
    group.add_argument("--image", type=Path, metavar="REF", help="the style reference (any image Pillow reads)")
    group.add_argument("--caption", help="a caption of the reference image (its prompt in the set)")
    group.add_argument("--fit", choices=["crop", "resize"], default="crop", help="cover and crop, or stretch")
    group.add_argument("--offset", type=int, default=5, help="trajectory index the reference starts from (default: 5)")
    group.add_argument("--inversion-guidance", type=float, default=2.0, help="guidance of the inversion (default: 2)")
    group.add_argument("--save-trajectory", type=Path, metavar="FILE", help="save the inversion (.safetensors)")
    group.add_argument("--trajectory", type=Path, metavar="FILE", help="reuse a saved inversion instead of --image")
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=run_transfer)
