"""`style-aligned transfer`: a set in the style of a real image (or a blend of several)."""

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from style_aligned.cli.options import (
    add_extras_options,
    add_field_options,
    add_model_options,
    add_set_options,
    add_style_options,
    default_help,
    given,
    load_for_set,
    set_values,
    write_set,
)

if TYPE_CHECKING:
    from PIL import Image

    from style_aligned.pipeline.transfer_inputs import TransferReferences


TRANSFER_FLAGS = ("fit", "offset", "inversion_guidance")
"""The reference image's options that are fields of `TransferSpec` as they are."""


def transfer_references(args: argparse.Namespace) -> "TransferReferences":
    """The references that `transfer`'s options give."""
    from style_aligned.pipeline.transfer_inputs import TransferReferences

    return TransferReferences(
        images=args.images or [],
        captions=args.captions or [],
        trajectories=args.trajectories or [],
        save_trajectories=args.save_trajectories or [],
    )


def transfer_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the `TransferSpec` fields that `transfer`'s options give (see `read_spec`)."""
    return set_values(args) | given(args, ("reference_weights", *TRANSFER_FLAGS))


def read_image(path: Path) -> "Image.Image":
    """Read a reference image.

    Raises:
        FileNotFoundError: If it does not exist.
        ValueError: If Pillow cannot read it.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"the reference image {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read the reference image {path}: {error}") from None
    return image


def run_transfer(args: argparse.Namespace) -> None:
    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.model import kind_of
    from style_aligned.pipeline.transfer import make_trajectory, transfer_set
    from style_aligned.pipeline.transfer_inputs import transfer_spec

    references = transfer_references(args)
    references.count(args.reference_weights)
    trajectories = [ReferenceTrajectory.load(path) for path in references.trajectories]
    spec = transfer_spec(transfer_values(args), references, trajectories[0] if trajectories else None)
    pictures = [read_image(path) for path in references.images]  # checked before the model is loaded
    asked = references.request(str(args.model), spec)
    sd = load_for_set(args, spec, asked)
    if sd is None:
        return
    spec = spec.resolved(sd)
    save_to: list[Path] = args.save_trajectories or []
    for index, (path, picture, caption) in enumerate(
        zip(args.images or [], pictures, args.captions or [], strict=True)
    ):
        print(f"inverting {path} ({spec.steps} {spec.solver} steps)", file=sys.stderr)
        trajectory = make_trajectory(sd, picture, caption, spec=spec)
        if save_to:
            trajectory.save(save_to[index])
            print(f"saved the inversion to {save_to[index]}", file=sys.stderr)
        trajectories.append(trajectory)
    if len(trajectories) > 1:  # one reference: its caption is the reference prompt (see `transfer_set`)
        spec = replace(spec, reference_prompts=[trajectory.caption for trajectory in trajectories])
    prompts = [*(t.caption for t in trajectories), *spec.prompts]
    details = references.details(str(args.model), trajectories) | {"backbone": kind_of(sd), "request": asked}
    write_set(
        args,
        "transfer",
        spec,
        prompts=prompts,
        make=lambda images, progress: transfer_set(sd, trajectories, spec, progress=progress, images=images),
        **details,
    )


def add_transfer_command(parser: argparse.ArgumentParser) -> None:
    from style_aligned.pipeline.transfer import OFFSET, TRANSFER_GUIDANCE, TransferSpec

    parser.description = (
        "Generate a set in the style of a real image: the image is inverted under its caption (DDIM on SD1 and SDXL,"
        " the flow's Euler steps backwards on FLUX.1), and its trajectory becomes the reference of the set (image 0,"
        " the reconstructed input). On SD1 and SDXL the defaults follow the reference implementation's transfer"
        f" example: shared GroupNorm, shift log 2, guidance {TRANSFER_GUIDANCE['sd1']:g}, offset {OFFSET['sd1']}."
    )
    add_model_options(parser)
    add_set_options(parser)
    group = parser.add_argument_group("reference image")
    group.add_argument(
        "--image",
        dest="images",
        type=Path,
        action="append",
        metavar="REF",
        help="the style reference (any image Pillow reads); repeat, each with its --caption, to blend several",
    )
    group.add_argument(
        "--caption", dest="captions", action="append", help="a caption of the reference image (its prompt in the set)"
    )
    group.add_argument(
        "--reference-weight",
        dest="reference_weights",
        type=float,
        action="append",
        metavar="W",
        help=default_help(TransferSpec, "reference_weights"),
    )
    add_field_options(group, TransferSpec, TRANSFER_FLAGS)
    group.add_argument(
        "--save-trajectory",
        dest="save_trajectories",
        type=Path,
        action="append",
        metavar="FILE",
        help="save the inversion (.safetensors; one per --image)",
    )
    group.add_argument(
        "--trajectory",
        dest="trajectories",
        type=Path,
        action="append",
        metavar="FILE",
        help="reuse a saved inversion instead of --image (repeat for several references)",
    )
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=run_transfer)
