"""`style-aligned panorama`: a wide panorama in the style of a reference image, by MultiDiffusion."""

import argparse
import sys
from pathlib import Path

from style_aligned.cli.options import add_model_options, add_style_options, load_model, size, style_options
from style_aligned.options import StyleAlignedOptions


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
    reference_prompt = str(args.caption if args.image is not None else args.reference_prompt)  # checked above
    width, height = args.size or (None, None)
    base = StyleAlignedOptions.for_transfer() if args.image is not None else StyleAlignedOptions()
    spec = PanoramaSpec(
        prompt=args.prompt,
        reference_prompt=reference_prompt,
        reference_image=args.image,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=width,
        height=height,
        view_size=args.view_size,
        stride=args.stride,
        view_batch=args.view_batch,
        style=base.replace(**style_options(args)),
        offset=args.offset,
        inversion_guidance=args.inversion_guidance,
        fit=args.fit,
    )
    spec.check()  # before the model loads
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
    parser.description = (
        "Generate a wide panorama in the style of a reference image: the reference (generated from"
        " --reference-prompt, or a real --image inverted under its --caption) is recorded at every step, and the"
        " panorama is denoised as overlapping views that attend to it, averaged by MultiDiffusion. Writes"
        " reference.png, panorama.png and panorama.json. Memory grows with --view-batch, not with the width."
    )
    add_model_options(parser)
    group = parser.add_argument_group("panorama")
    group.add_argument("--prompt", required=True, help="prompt of the panorama")
    group.add_argument("--reference-prompt", help="prompt of the reference image (or give --image and --caption)")
    group.add_argument("--negative-prompt", default="", help="negative prompt of the reference and the panorama")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    group.add_argument("--guidance", type=float, default=None, help="default: 5 (SDXL), 7.5 (SD1)")
    group.add_argument(
        "--size", type=size, default=None, metavar="WxH", help="panorama size (default: 2048x512 SD1, 4096x1024 SDXL)"
    )
    group.add_argument(
        "--view-size", type=int, default=None, metavar="PX", help="square view side (default: 512 SD1, 1024 SDXL)"
    )
    group.add_argument(
        "--stride", type=int, default=None, metavar="PX", help="step between views (default: 64 SD1, 128 SDXL)"
    )
    group.add_argument("--view-batch", type=int, default=4, metavar="N", help="views per U-Net call (default: 4)")
    group.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the images")
    reference = parser.add_argument_group("reference image (instead of --reference-prompt)")
    reference.add_argument("--image", type=Path, metavar="REF", help="a real reference image, inverted with DDIM")
    reference.add_argument("--caption", help="a caption of the reference image")
    reference.add_argument("--fit", choices=["crop", "resize"], default="crop", help="cover and crop, or stretch")
    reference.add_argument("--offset", type=int, default=5, help="trajectory index the reference starts from")
    reference.add_argument("--inversion-guidance", type=float, default=2.0, help="guidance of the inversion")
    add_style_options(parser)
    parser.set_defaults(command=run_panorama)
