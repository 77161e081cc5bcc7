"""`style-aligned transfer`: a set in the style of a real image."""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from style_aligned.cli.options import (
    add_extras_options,
    add_model_options,
    add_set_options,
    add_style_options,
    extras,
    load_model,
    style_options,
    write_set,
)
from style_aligned.options import StyleAlignedOptions


def run_transfer(args: argparse.Namespace) -> None:
    from PIL import Image, UnidentifiedImageError

    from style_aligned.pipeline.inversion import ReferenceTrajectory
    from style_aligned.pipeline.set_files import sidecar
    from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_set

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
    loaded = [ReferenceTrajectory.load(path) for path in saved]
    first = loaded[0] if loaded else None
    width, height = args.size or ((first.width, first.height) if first else (None, None))
    steps = args.steps or (len(first.timesteps) if first else 50)
    spec = TransferSpec(
        prompts=args.prompts,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=steps,
        guidance=args.guidance,
        width=width,
        height=height,
        chunk_size=args.chunk_size,
        style=StyleAlignedOptions.for_transfer().replace(**style_options(args)),
        offset=args.offset,
        inversion_guidance=args.inversion_guidance,
        fit=args.fit,
        reference_weights=weights,
        **extras(args),
    )
    spec = replace(spec, reference_prompts=[f"reference {i + 1}" for i in range(count)] if count > 1 else None)
    spec.mixture_weights()  # checked before the model loads
    pictures: list[Image.Image] = []
    for path in images:
        try:
            picture = Image.open(path)
            picture.load()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read the reference image {path}: {error}") from None
        pictures.append(picture)
    sd = load_model(args)
    spec = spec.resolved(sd)
    trajectories = loaded
    for index, (path, picture, caption) in enumerate(zip(images, pictures, captions, strict=True)):
        print(f"inverting {path} ({spec.steps} DDIM steps)", file=sys.stderr)
        trajectory = make_trajectory(sd, picture, caption, spec)
        if save_to:
            trajectory.save(save_to[index])
            print(f"saved the inversion to {save_to[index]}", file=sys.stderr)
        trajectories.append(trajectory)
    references = [trajectory.caption for trajectory in trajectories]
    prompts = [*references, *spec.prompts]
    spec = replace(
        spec,
        reference_prompts=references if count > 1 else None,
        reference_prompt=references[0] if count == 1 else None,
    )
    details = {
        "model": str(args.model),
        "image": str(images[0]) if len(images) == 1 else None,
        "caption": references[0] if count == 1 else None,
        "trajectory": (str((saved or save_to)[0]) if (saved or save_to) else None) if count == 1 else None,
        "reference_images": [str(path) for path in images] or None,
        "reference_trajectories": [str(path) for path in (saved or save_to)] or None,
    }
    reference = trajectories
    write_set(
        args.out,
        lambda bar: transfer_set(sd, reference, spec, progress=bar),
        sidecar("transfer", spec, prompts, **details),
        title=f"style transfer, seed {spec.seed}",
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
