"""The option groups that the commands share, and what they turn into: specs, models, progress, set files."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from style_aligned.options import StyleAlignedOptions, option_fields

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """The StyleAligned options, one flag per field of `StyleAlignedOptions`; unset ones keep the command's defaults."""
    group = parser.add_argument_group("StyleAligned options (docs/parameters.md)")
    for option in option_fields():
        flag = f"--{option.name.replace('_', '-')}"
        if option.kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=option.help)
        else:
            group.add_argument(
                flag,
                type=option.kind,
                choices=option.choices,
                nargs="+" if option.many else None,
                default=None,
                metavar=None if option.choices else option.name.rsplit("_", 1)[-1].upper(),
                help=option.help,
            )


def style_options(args: argparse.Namespace) -> dict[str, Any]:
    """The StyleAligned options given on the command line, as changes to a command's defaults."""
    return {name: value for name in StyleAlignedOptions.names() if (value := getattr(args, name, None)) is not None}


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
    from style_aligned.pipeline.composition import LoraSpec

    path, _, scale = text.rpartition(":")
    try:
        return LoraSpec(Path(path), float(scale)) if path else LoraSpec(Path(text))
    except ValueError:
        return LoraSpec(Path(text))


def extras(args: argparse.Namespace) -> dict[str, Any]:
    """The controls, LoRAs and IP-Adapter given on the command line, as `SetSpec` fields."""
    from style_aligned.pipeline.composition import ControlSpec, IPAdapterSpec

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
    from style_aligned.weights.loading import load_pipeline

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
    from style_aligned.pipeline.set_files import SIDECAR, write_json, write_set_images

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SIDECAR, details)
    bar = ProgressBar(f"{len(details['image_prompts'])} images")
    try:
        generated = make(bar)
    finally:
        bar.close()
    write_set_images(
        out, generated.images, generated.prompts, title=title, num_references=generated.spec.num_references()
    )
    print(out)
