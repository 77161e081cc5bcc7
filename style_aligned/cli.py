"""The `style-aligned` command."""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from style_aligned.evaluation import add_evaluate_command
from style_aligned.safetensors_io import WeightsError
from style_aligned.sweep import add_sweep_command

Command = Callable[[argparse.Namespace], None]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def size(text: str) -> tuple[int, int]:
    """Parse `WxH` (or `N` for a square) into (width, height)."""
    try:
        width, _, height = text.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1024x1024, got {text!r}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=Path, required=True, metavar="DIR", help="converted or diffusers SD folder")
    group.add_argument("--cache-dir", type=Path, help="keep the conversion of a diffusers folder here")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on GPU, float32 on CPU")


def add_style_options(parser: argparse.ArgumentParser) -> None:
    """The StyleAlignedAdapter options; unset ones keep the command's defaults."""
    group = parser.add_argument_group("StyleAligned options (docs/parameters.md)")
    for name in ("adain-queries", "adain-keys", "adain-values", "share-group-norm"):
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--shared-score-scale", type=float, metavar="S", help="factor on the reference keys (> 0)")
    group.add_argument("--shared-score-shift", type=float, metavar="B", help="logit shift of reference tokens")
    group.add_argument("--only-self-level", type=float, metavar="L", help="fraction of layers left unshared, 0-1")
    group.add_argument("--shared-layers", type=int, nargs="+", metavar="I", help="indices of the layers to share")
    group.add_argument("--shared-blocks", choices=["down", "mid", "up"], nargs="+", help="U-Net blocks to share")
    group.add_argument("--full-attention-share", action="store_true", default=None, help="all images attend to all")
    group.add_argument("--control-reference", action="store_true", default=None, help="control the reference too")


STYLE_OPTIONS = (
    "adain_queries",
    "adain_keys",
    "adain_values",
    "share_group_norm",
    "shared_score_scale",
    "shared_score_shift",
    "only_self_level",
    "shared_layers",
    "shared_blocks",
    "full_attention_share",
    "control_reference",
)


def style_options(args: argparse.Namespace) -> dict[str, Any]:
    """The StyleAlignedAdapter options given on the command line."""
    return {name: getattr(args, name) for name in STYLE_OPTIONS if getattr(args, name, None) is not None}


def add_set_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("set")
    group.add_argument("--prompt", dest="prompts", action="append", required=True, help="one per image (repeat)")
    group.add_argument("--negative-prompt", default="", help="negative prompt of every image")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    group.add_argument("--guidance", type=float, default=None, help="default: 5 (SDXL), 7.5 (SD1)")
    group.add_argument("--size", type=size, default=None, metavar="WxH", help="default: 1024 (SDXL), 512 (SD1)")
    group.add_argument("--chunk-size", type=int, default=None, metavar="N", help="targets per batch (default: all)")
    group.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the images")


def add_extras_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet, LoRA, IP-Adapter")
    group.add_argument("--controlnet", type=Path, metavar="FILE", help="a ControlNet converted by `convert`")
    group.add_argument(
        "--control", type=Path, action="append", metavar="IMAGE", help="control image: one for all targets or one per"
    )
    group.add_argument("--control-scale", type=float, default=1.0, metavar="S", help="ControlNet scale (default: 1)")
    group.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA and its scale (repeat)")
    group.add_argument("--ip-adapter", type=Path, metavar="FILE", help="IP-Adapter weights (Refiners layout)")
    group.add_argument("--ip-adapter-encoder", type=Path, metavar="FILE", help="its CLIP ViT-H image encoder")
    group.add_argument("--ip-adapter-image", type=Path, metavar="IMAGE", help="the image prompt")
    group.add_argument("--ip-adapter-scale", type=float, default=1.0, metavar="S", help="IP-Adapter scale")


def lora(text: str) -> Any:
    from style_aligned.composition import LoraSpec

    path, _, scale = text.rpartition(":")
    try:
        return LoraSpec(Path(path), float(scale)) if path else LoraSpec(Path(text))
    except ValueError:
        return LoraSpec(Path(text))


def extras(args: argparse.Namespace) -> dict[str, Any]:
    """The controls, LoRAs and IP-Adapter given on the command line, as `SetSpec` fields."""
    from style_aligned.composition import ControlSpec, IPAdapterSpec

    if bool(args.controlnet) != bool(args.control):
        raise ValueError("a ControlNet needs both --controlnet FILE and at least one --control IMAGE")
    weights, encoder, image = args.ip_adapter, args.ip_adapter_encoder, args.ip_adapter_image
    if (weights or encoder or image) and not (weights and encoder and image):
        raise ValueError("an IP-Adapter needs --ip-adapter, --ip-adapter-encoder and --ip-adapter-image")
    loras: list[str] = args.lora or []
    return {
        "controls": [ControlSpec(args.controlnet, list(args.control), args.control_scale)] if args.controlnet else [],
        "loras": [lora(text) for text in loras],
        "ip_adapter": IPAdapterSpec(weights, encoder, image, args.ip_adapter_scale) if weights else None,
    }


def set_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `SetSpec` fields of the set and extras options (all but `reference_prompt` and `style`)."""
    width, height = args.size or (None, None)
    return {
        "prompts": args.prompts,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "width": width,
        "height": height,
        "chunk_size": args.chunk_size,
        **extras(args),
    }


def load_model(args: argparse.Namespace) -> Any:
    from style_aligned.loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device == "cpu" else torch.float16)
    print(f"loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return load_pipeline(args.model, device=device, dtype=dtype, cache_dir=args.cache_dir)


class ProgressBar:
    """A progress bar of steps and chunks, on standard error."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, desc=description, unit="call", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event: Any) -> None:
        self._bar.total = event.total
        if event.phase == "decode":
            self._bar.set_postfix_str(f"decoding {event.chunk}/{event.chunks}")
        else:
            self._bar.set_postfix_str(f"step {event.step}/{event.steps}, chunk {event.chunk}/{event.chunks}")
        self._bar.update(event.done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def write_set(out: Path, make: Callable[[ProgressBar], Any], details: dict[str, Any], title: str) -> None:
    """Write a set's sidecar, make the set under a progress bar, then write its images and grid, and print `out`.

    Args:
        out: The set's folder (created if needed).
        make: Makes the set (a `GeneratedSet`), reporting to the progress bar it is given.
        details: The sidecar (see `set_files.sidecar`); written first, so that an interrupted set says what it was.
        title: The title of the grid image.
    """
    from style_aligned.set_files import SIDECAR, write_json, write_set_images

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SIDECAR, details)
    bar = ProgressBar(f"{len(details['image_prompts'])} images")
    try:
        generated = make(bar)
    finally:
        bar.close()
    write_set_images(out, generated.images, generated.prompts, title=title)
    print(out)


def _generate(args: argparse.Namespace) -> None:
    from style_aligned.generate import SetSpec, generate_set
    from style_aligned.set_files import sidecar

    spec = SetSpec(**set_fields(args), reference_prompt=args.reference_prompt, style=style_options(args))
    sd = load_model(args)
    spec = spec.resolved(sd)
    write_set(
        args.out,
        lambda bar: generate_set(sd, spec, progress=bar),
        sidecar("generate", spec, spec.image_prompts(), model=str(args.model)),
        title=f"style-aligned set, seed {spec.seed}",
    )


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate a style-consistent set: the first image (--reference-prompt, or the first --prompt) is the"
        " reference, the others share its style. Writes one PNG per image, a labelled grid.png and set.json."
    )
    add_model_options(parser)
    add_set_options(parser)
    parser.add_argument("--reference-prompt", help="prompt of an extra reference image placed first")
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=_generate)


def _transfer(args: argparse.Namespace) -> None:
    from PIL import Image, UnidentifiedImageError

    from style_aligned.inversion import ReferenceTrajectory
    from style_aligned.set_files import sidecar
    from style_aligned.transfer import TRANSFER_STYLE, TransferSpec, make_trajectory, transfer_set

    if args.trajectory is None and (args.image is None or args.caption is None):
        raise ValueError("give the reference as --image and --caption, or reuse an inversion with --trajectory")
    trajectory = ReferenceTrajectory.load(args.trajectory) if args.trajectory else None
    width, height = args.size or ((trajectory.width, trajectory.height) if trajectory else (None, None))
    steps = args.steps or (len(trajectory.timesteps) if trajectory else 50)
    spec = TransferSpec(
        prompts=args.prompts,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=steps,
        guidance=args.guidance,
        width=width,
        height=height,
        chunk_size=args.chunk_size,
        style={**TRANSFER_STYLE, **style_options(args)},
        offset=args.offset,
        inversion_guidance=args.inversion_guidance,
        fit=args.fit,
        **extras(args),
    )
    sd = load_model(args)
    spec = spec.resolved(sd)
    if trajectory is None:
        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read the reference image {args.image}: {error}") from None
        print(f"inverting {args.image} ({spec.steps} DDIM steps)", file=sys.stderr)
        trajectory = make_trajectory(sd, image, args.caption, spec)
        if args.save_trajectory:
            trajectory.save(args.save_trajectory)
            print(f"saved the inversion to {args.save_trajectory}", file=sys.stderr)
    prompts = [trajectory.caption, *spec.prompts]
    details = {
        "model": str(args.model),
        "image": str(args.image) if args.image else None,
        "caption": trajectory.caption,
        "trajectory": str(args.trajectory or args.save_trajectory or "") or None,
    }
    reference = trajectory
    write_set(
        args.out,
        lambda bar: transfer_set(sd, reference, spec, progress=bar),
        sidecar("transfer", spec, prompts, **details),
        title=f"style transfer, seed {spec.seed}",
    )


def _add_transfer(parser: argparse.ArgumentParser) -> None:
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
    parser.set_defaults(command=_transfer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="style-aligned",
        description="Style-consistent image sets from Stable Diffusion by StyleAligned shared attention.",
    )
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_convert(subparsers.add_parser("convert", help="convert diffusers SD1/SDXL weights to Refiners weights"))
    _add_generate(subparsers.add_parser("generate", help="generate a style-consistent set of images"))
    _add_transfer(subparsers.add_parser("transfer", help="generate a set in the style of a real image"))
    add_evaluate_command(
        subparsers.add_parser("evaluate", help="score sets: CLIP text alignment and DINO set consistency")
    )
    add_sweep_command(subparsers.add_parser("sweep", help="generate a set per setting of a grid of options, and plot"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; errors in the user's inputs end it with a message and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        command(args)
    except (WeightsError, ValueError, FileNotFoundError, ImportError) as error:
        parser.exit(2, f"style-aligned: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "style-aligned: interrupted (files already written are complete)\n")


if __name__ == "__main__":
    main()
