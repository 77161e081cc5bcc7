"""`style-aligned transfer`: a set in the style of a real image (or a blend of several)."""

import argparse
import sys
from dataclasses import replace
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
    say_complete,
    style_options,
    write_set,
)
from style_aligned.options import StyleAlignedOptions

if TYPE_CHECKING:
    from PIL import Image

    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.transfer import TransferSpec


def reference_count(args: argparse.Namespace) -> int:
    """The number of references that `transfer`'s options give (images with captions, or saved inversions).

    Raises:
        ValueError: If the references are not given in one way, or their options do not pair up.
    """
    images: list[Path] = args.images or []
    captions: list[str] = args.captions or []
    saved: list[Path] = args.trajectories or []
    save_to: list[Path] = args.save_trajectories or []
    if not saved and (not images or len(images) != len(captions)):
        raise ValueError(
            "give the reference as --image and --caption, or reuse an inversion with --trajectory (one --caption"
            f" per --image; got {len(images)} images and {len(captions)} captions)"
        )
    if saved and images:
        raise ValueError("give the references as --image/--caption pairs or as --trajectory files, not both")
    if save_to and len(save_to) != len(images):
        raise ValueError(f"give one --save-trajectory per --image: {len(save_to)} for {len(images)} images")
    count = len(saved) or len(images)
    weights: list[float] | None = args.reference_weights
    if weights is not None and len(weights) != count:
        raise ValueError(f"give one --reference-weight per reference: {len(weights)} for {count} references")
    return count


def transfer_spec(args: argparse.Namespace, first: "ReferenceTrajectory | None" = None) -> "TransferSpec":
    """The set that `transfer` makes from its options; size and steps default to those of a reused inversion.

    Everything that can be checked without the model is checked.

    Raises:
        ValueError: If an option is out of range, or the solver is not the inversion's.
    """
    from style_aligned.pipeline.transfer import TransferSpec, check_transfer_solver

    check_transfer_solver(args.solver, args.timestep_spacing)
    count = reference_count(args)
    width, height = args.size or ((first.width, first.height) if first else (None, None))
    steps = args.steps or (len(first.timesteps) if first else 50)
    spec = TransferSpec(
        prompts=args.prompts,
        reference_prompts=[f"reference {i + 1}" for i in range(count)] if count > 1 else None,
        reference_weights=args.reference_weights,
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


def transfer_details(args: argparse.Namespace, trajectories: "list[ReferenceTrajectory]") -> dict[str, Any]:
    """What a transfer set's sidecar adds to its settings: the model, the images, their captions and inversions."""
    images: list[Path] = args.images or []
    files: list[Path] = args.trajectories or args.save_trajectories or []
    details: dict[str, Any] = {"model": str(args.model)}
    if len(trajectories) == 1:
        return details | {
            "image": str(images[0]) if images else None,
            "caption": trajectories[0].caption,
            "trajectory": str(files[0]) if files else None,
        }
    return details | {
        "image": None,
        "caption": None,
        "trajectory": None,
        "reference_images": [str(path) for path in images] or None,
        "reference_trajectories": [str(path) for path in files] or None,
    }


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


def transfer_request(args: argparse.Namespace, spec: "TransferSpec") -> dict[str, Any]:
    """What a `transfer` set is asked for: the spec as given, the model and the references as given."""
    from style_aligned.pipeline.set_files import set_request

    images: list[Path] = args.images or []
    captions: list[str] = args.captions or []
    saved: list[Path] = args.trajectories or []
    references = {
        "images": [str(path) for path in images],
        "captions": captions,
        "trajectories": [str(path) for path in saved],
    }
    return set_request("transfer", spec, model=str(args.model), **references)


def run_transfer(args: argparse.Namespace) -> None:
    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.set_files import set_title, sidecar
    from style_aligned.pipeline.transfer import make_trajectory, transfer_set

    reference_count(args)
    saved: list[Path] = args.trajectories or []
    images: list[Path] = args.images or []
    trajectories = [ReferenceTrajectory.load(path) for path in saved]
    spec = transfer_spec(args, trajectories[0] if trajectories else None)
    pictures = [read_image(path) for path in images]  # checked before the model is loaded
    asked = transfer_request(args, spec)
    if check_out(args.out, asked, args.overwrite):
        return say_complete(args.out)
    check_files(args)
    sd = load_model(args)
    spec = spec.resolved(sd)
    save_to: list[Path] = args.save_trajectories or []
    for index, (path, picture, caption) in enumerate(
        zip(args.images or [], pictures, args.captions or [], strict=True)
    ):
        print(f"inverting {path} ({spec.steps} DDIM steps)", file=sys.stderr)
        trajectory = make_trajectory(sd, picture, caption, spec=spec)
        if save_to:
            trajectory.save(save_to[index])
            print(f"saved the inversion to {save_to[index]}", file=sys.stderr)
        trajectories.append(trajectory)
    if len(trajectories) > 1:  # one reference: its caption is the reference prompt (see `transfer_set`)
        spec = replace(spec, reference_prompts=[trajectory.caption for trajectory in trajectories])
    prompts = [*(t.caption for t in trajectories), *spec.prompts]
    details = transfer_details(args, trajectories) | {"request": asked}
    write_set(
        args.out,
        sidecar("transfer", spec, prompts, **details),
        lambda images, progress: transfer_set(sd, trajectories, spec, progress=progress, images=images),
        plan=spec.plan(),
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
        help="relative weight of each reference, in order (default: equal); a log-weight on its logits",
    )
    group.add_argument("--fit", choices=["crop", "resize"], default="crop", help="cover and crop, or stretch")
    group.add_argument("--offset", type=int, default=5, help="trajectory index the reference starts from (default: 5)")
    group.add_argument("--inversion-guidance", type=float, default=2.0, help="guidance of the inversion (default: 2)")
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
