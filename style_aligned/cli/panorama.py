"""`style-aligned panorama`: a wide panorama in the style of a reference image, by MultiDiffusion."""

import argparse
import sys
from pathlib import Path

from style_aligned.cli.options import (
    add_field_options,
    add_model_options,
    add_style_options,
    check_for_model,
    given,
    load_model,
    size,
    style_options,
)
from style_aligned.options import StyleAlignedOptions

PANORAMA_FLAGS = ("negative_prompt", "seed", "steps", "guidance", "view_size", "stride", "view_batch")
"""The panorama's options that are fields of `PanoramaSpec` as they are."""
REFERENCE_FLAGS = ("fit", "offset", "inversion_guidance")
"""The options of a real reference image that are fields of `PanoramaSpec` as they are."""


def run_panorama(args: argparse.Namespace) -> None:
    from style_aligned.pipeline.panorama import (
        PANORAMA_SIDECAR,
        PanoramaSpec,
        generate_panorama,
        panorama_sidecar,
        panorama_views,
        save_panorama,
    )
    from style_aligned.pipeline.set_files import write_json
    from style_aligned.pipeline.spec_fields import read_spec

    if args.image is not None:
        if args.caption is None:
            raise ValueError("a reference --image needs its --caption")
        if args.reference_prompt is not None:
            raise ValueError("give the reference as --reference-prompt or as --image with --caption, not both")
        if not args.image.is_file():
            raise FileNotFoundError(f"the reference image {args.image} does not exist")
    elif args.caption is not None:
        raise ValueError("--caption describes a reference --image; without one, use --reference-prompt")
    elif args.reference_prompt is None:
        raise ValueError("give the reference as --reference-prompt, or as --image with --caption")
    values = given(args, ("prompt", "reference_prompt", *PANORAMA_FLAGS, *REFERENCE_FLAGS))
    if args.image is not None:
        values |= {"reference_prompt": args.caption, "reference_image": str(args.image)}
    if args.size is not None:
        values["width"], values["height"] = args.size
    if (style := style_options(args)) or args.image is not None:  # a real image: the transfer example's options
        base = StyleAlignedOptions.for_transfer().to_dict() if args.image is not None else {}
        values["style"] = base | style
    spec = read_spec(PanoramaSpec, values)
    spec.check()  # before the model loads
    check_for_model(args, spec)
    sd = load_model(args)
    spec = spec.resolved(sd)
    views = panorama_views(spec)
    details = {"model": str(args.model)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / PANORAMA_SIDECAR, panorama_sidecar("panorama", spec, views, **details))
    print(f"{spec.width}x{spec.height} px panorama, {len(views)} views, {spec.view_batch} at a time", file=sys.stderr)
    from style_aligned.cli.options import ProgressBar

    bar = ProgressBar(f"{len(views)} views")
    try:
        panorama = generate_panorama(sd, spec, progress=bar)
    finally:
        bar.close()
    save_panorama(args.out, panorama, **details)
    print(args.out)


def add_panorama_command(parser: argparse.ArgumentParser) -> None:
    from style_aligned.pipeline.panorama import PanoramaSpec

    parser.description = (
        "Generate a wide panorama in the style of a reference image: the reference (generated from"
        " --reference-prompt, or a real --image inverted under its --caption) is recorded at every step, and the"
        " panorama is denoised as overlapping views that attend to it, averaged by MultiDiffusion. Writes"
        " reference.png, panorama.png and panorama.json. Memory grows with --view-batch, not with the width."
    )
    add_model_options(parser)
    group = parser.add_argument_group("panorama")
    add_field_options(group, PanoramaSpec, ("prompt", "reference_prompt"), required=("prompt",))
    add_field_options(
        group, PanoramaSpec, PANORAMA_FLAGS, metavars={"view_size": "PX", "stride": "PX", "view_batch": "N"}
    )
    group.add_argument(
        "--size", type=size, default=None, metavar="WxH", help="panorama size (default: 2048x512 SD1, 4096x1024 SDXL)"
    )
    group.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the images")
    reference = parser.add_argument_group("reference image (instead of --reference-prompt)")
    reference.add_argument("--image", type=Path, metavar="REF", help="a real reference image, inverted with DDIM")
    reference.add_argument("--caption", help="a caption of the reference image")
    add_field_options(reference, PanoramaSpec, REFERENCE_FLAGS)
    add_style_options(parser)
    parser.set_defaults(command=run_panorama)
