"""The option groups that the commands share, and what they turn into: specs, models, progress, set files."""

import argparse
import dataclasses
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from style_aligned.options import StyleAlignedOptions, describe_fields, option_fields

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def size(text: str) -> tuple[int, int]:
    """Parse `WxH` (or `N` for a square) into (width, height)."""
    from style_aligned.pipeline.spec_fields import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help="a Hugging Face Hub repo id org/name[@revision], a diffusers or converted folder, a single-file SD1/SDXL"
        " checkpoint (.safetensors, original layout), or a FLUX.1 pipeline (Hub id, diffusers folder) or transformer"
        f" file (flux1-dev.safetensors); default: {DEFAULT_MODEL}",
    )
    group.add_argument("--cache-dir", type=Path, help="keep the conversion of a diffusers folder or single file here")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: float32 on CPU; on GPU float16, bfloat16 for FLUX.1",
    )
    group.add_argument(
        "--offload",
        action="store_true",
        help="FLUX.1: keep only the model in use on the GPU (text encoders, then transformer, then autoencoder)",
    )


def add_style_options(parser: argparse.ArgumentParser) -> None:
    """The StyleAligned options, one flag per field of `StyleAlignedOptions`; unset ones keep the command's defaults
    (which differ between commands: their defaults are in the help of the commands, not of the flags)."""
    group = parser.add_argument_group("StyleAligned options (docs/parameters.md)")
    metavars = {option.name: option.name.rsplit("_", 1)[-1].upper() for option in option_fields() if not option.choices}
    add_field_options(group, StyleAlignedOptions, StyleAlignedOptions.names(), metavars=metavars, show_defaults=False)


def style_options(args: argparse.Namespace) -> dict[str, Any]:
    """The StyleAligned options given on the command line, as changes to a command's defaults."""
    return {name: value for name in StyleAlignedOptions.names() if (value := getattr(args, name, None)) is not None}


SET_FLAGS = ("negative_prompt", "seed", "steps", "guidance", "solver", "timestep_spacing", "chunk_size")
"""The set options that are fields of `SetSpec` as they are (`--prompt`, `--size` and the extras have their own
syntax)."""


def default_text(default: Any) -> str:
    """How a field's default is shown after its help (nothing for a default left to the model kind, or empty)."""
    if default is None or default == "" or isinstance(default, list | tuple | dict):
        return ""
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def add_field_options(
    group: Any,
    spec_type: type,
    names: Sequence[str],
    *,
    metavars: Mapping[str, str] | None = None,
    required: Collection[str] = (),
    show_defaults: bool = True,
) -> None:
    """One flag per field of a spec (`--chunk-size` for `chunk_size`, or the flag the field names: `--style-strength`
    for `strength`), its type, choices and help (with the field's default, if `show_defaults`) read from the field;
    the default is `None`, so that only the options given enter the spec's values (see `given`)."""
    fields = {option.name: option for option in describe_fields(spec_type)}
    for name in names:
        option = fields[name]
        flag = option.flag
        help = (option.help + (default_text(option.default) if show_defaults else "")).replace("%", "%%")
        if option.kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=name, help=help)
            continue
        group.add_argument(
            flag,
            dest=name,
            type=option.kind,
            choices=option.choices,
            nargs="+" if option.many else None,
            default=None,
            metavar=(metavars or {}).get(name),
            required=name in required,
            help=help,
        )


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options given on the command line among `names`, by name (those left out take the spec's defaults)."""
    return {name: value for name in names if (value := getattr(args, name, None)) is not None}


def add_set_options(parser: argparse.ArgumentParser) -> None:
    from style_aligned.pipeline.spec import SetSpec

    group = parser.add_argument_group("set")
    prompts = default_help(SetSpec, "prompts")
    group.add_argument("--prompt", dest="prompts", action="append", required=True, help=f"{prompts} (repeat)")
    add_field_options(group, SetSpec, SET_FLAGS, metavars={"chunk_size": "N"})
    group.add_argument("--size", type=size, default=None, metavar="WxH", help="default: 1024 (SDXL), 512 (SD1)")
    group.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the images")
    group.add_argument("--overwrite", action="store_true", help="replace the set already in --out (it must be one)")


def default_help(spec_type: type, name: str) -> str:
    """The help of a field of a spec or of a part of it, with its default."""
    option = next(option for option in describe_fields(spec_type) if option.name == name)
    return option.help + default_text(option.default)


def add_extras_options(parser: argparse.ArgumentParser) -> None:
    from style_aligned.pipeline.composition import ControlSpec, IPAdapterSpec

    group = parser.add_argument_group("ControlNet, LoRA, IP-Adapter")
    group.add_argument(
        "--controlnet", metavar="FILE", help="a ControlNet converted by `convert` (a file, or org/name/path on the Hub)"
    )
    group.add_argument(
        "--control", type=Path, action="append", metavar="IMAGE", help="control image: one for all targets or one per"
    )
    control_scale = f"ControlNet scale{default_text(default_of(ControlSpec, 'scale'))}"
    group.add_argument("--control-scale", type=float, default=None, metavar="S", help=control_scale)
    group.add_argument(
        "--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA (file or org/name/path on the Hub), its scale"
    )
    group.add_argument(
        "--ip-adapter", metavar="FILE", help="IP-Adapter weights (published layout; file or org/name/path)"
    )
    group.add_argument(
        "--ip-adapter-encoder", metavar="FILE", help="its CLIP ViT-H image encoder (transformers or Refiners layout)"
    )
    group.add_argument("--ip-adapter-image", type=Path, metavar="IMAGE", help="the image prompt")
    ip_scale = f"IP-Adapter scale{default_text(default_of(IPAdapterSpec, 'scale'))}"
    group.add_argument("--ip-adapter-scale", type=float, default=None, metavar="S", help=ip_scale)


def default_of(cls: type, name: str) -> Any:
    """The default of a field of a dataclass."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def lora(text: str) -> dict[str, Any]:
    """A LoRA given as `FILE[:SCALE]`, as the values of a `LoraSpec`."""
    path, _, scale = text.rpartition(":")
    try:
        return {"path": path, "scale": float(scale)} if path else {"path": text}
    except ValueError:
        return {"path": text}


def extras(args: argparse.Namespace) -> dict[str, Any]:
    """The controls, LoRAs and IP-Adapter given on the command line, as values of `SetSpec` fields."""
    if bool(args.controlnet) != bool(args.control):
        raise ValueError("a ControlNet needs both --controlnet FILE and at least one --control IMAGE")
    weights, encoder, image = args.ip_adapter, args.ip_adapter_encoder, args.ip_adapter_image
    if (weights or encoder or image) and not (weights and encoder and image):
        raise ValueError("an IP-Adapter needs --ip-adapter, --ip-adapter-encoder and --ip-adapter-image")
    values: dict[str, Any] = {}
    if args.controlnet:
        control = {"weights": args.controlnet, "images": [str(path) for path in args.control]}
        values["controls"] = [control | _scale(args.control_scale)]
    if args.lora:
        values["loras"] = [lora(text) for text in args.lora]
    if weights:
        adapter = {"weights": weights, "image_encoder": encoder, "image": str(image)}
        values["ip_adapter"] = adapter | _scale(args.ip_adapter_scale)
    return values


def _scale(scale: float | None) -> dict[str, float]:
    return {} if scale is None else {"scale": scale}


def set_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the `SetSpec` fields given by the set, StyleAligned and extras options (all but the
    references)."""
    values = given(args, ("prompts", *SET_FLAGS))
    if args.size is not None:
        values["width"], values["height"] = args.size
    if style := style_options(args):
        values["style"] = style
    return values | extras(args)


def check_out(out: Path, asked: dict[str, Any], overwrite: bool) -> bool:
    """Check what `--out` holds for the set asked for, before any expensive work (see `SetFolder`).

    Returns:
        Whether `out` already holds the whole set asked for (nothing is left to do).

    Raises:
        ValueError: If `out` holds another set and `overwrite` is not given, or holds files not written by
            style-aligned.
    """
    from style_aligned.pipeline.set_files import folder_state

    state = folder_state(out, asked)
    if state == "foreign":
        raise ValueError(
            f"--out {out} is not empty and holds no set written by style-aligned: it is not replaced, even with"
            " --overwrite; choose another folder"
        )
    if state == "other" and not overwrite:
        raise ValueError(f"--out {out} holds another set: choose another folder, or pass --overwrite to replace it")
    return state == "complete"


def say_complete(out: Path) -> None:
    """Say that `--out` already holds the set asked for, and print it (the command then exits 0)."""
    print(f"{out} already holds this set: nothing to do", file=sys.stderr)
    print(out)


def check_files(args: argparse.Namespace) -> None:
    """Check that the local input files given exist (Hub files are fetched when the model loads).

    Raises:
        FileNotFoundError: If a control or IP-Adapter image is missing, or a weights file is neither a local file
            nor a Hub file id.
    """
    from style_aligned.weights.hub import parse_file_id

    images: list[Path] = list(getattr(args, "control", None) or [])
    if (image := getattr(args, "ip_adapter_image", None)) is not None:
        images.append(image)
    if missing := [str(path) for path in images if not path.is_file()]:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    loras: list[str] = getattr(args, "lora", None) or []
    weights = [lora(text)["path"] for text in loras]
    weights += [getattr(args, name, None) for name in ("controlnet", "ip_adapter", "ip_adapter_encoder")]
    for reference in filter(None, weights):
        if not Path(reference).exists() and parse_file_id(str(reference)) is None:
            raise FileNotFoundError(f"{reference} does not exist (give a file, or a Hub file as org/name/path/in/repo)")


def model_kind_given(args: argparse.Namespace) -> Any:
    """The kind of `--model` if it is FLUX.1 (`"flux_dev"`, `"flux_schnell"`), told without loading it, or None for
    an SD1 or SDXL model (see `flux_kind`).

    Raises:
        ValueError: If `--offload` is given for an SD1 or SDXL model.
    """
    from style_aligned.weights.families import flux_kind

    kind = flux_kind(args.model)
    if getattr(args, "offload", False) and kind is None:
        raise ValueError("--offload is for FLUX.1 models; SD1 and SDXL fit the accelerator whole")
    return kind


def check_for_model(args: argparse.Namespace, spec: Any) -> None:
    """Check a spec against what `--model` takes, before the model loads (see `SetSpec.refusals`); the model's kind
    is told once per command.

    Raises:
        ValueError: Naming the first problem.
    """
    if not hasattr(args, "model_kind"):
        args.model_kind = model_kind_given(args)
    spec.resolved(args.model_kind or "sd1")  # SD1 and SDXL refuse the same options


def load_for_set(args: argparse.Namespace, spec: Any, asked: dict[str, Any]) -> Any | None:
    """Check a set's spec against `--model` (see `check_for_model`), what `--out` holds (see `check_out`) and the local
    files, then load the model; None, once said, when `--out` already holds the set asked for."""
    check_for_model(args, spec)
    if check_out(args.out, asked, args.overwrite):
        say_complete(args.out)
        return None
    check_files(args)
    return load_model(args)


def load_model(args: argparse.Namespace) -> Any:
    from style_aligned.weights.families import flux_kind, load_models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    half = torch.bfloat16 if flux_kind(args.model) else torch.float16
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device == "cpu" else half)
    offload = getattr(args, "offload", False)
    where = f"{device}{', offloaded' if offload else ''}"
    print(f"loading {args.model} on {where} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return load_models(args.model, device=device, dtype=dtype, cache_dir=args.cache_dir, offload=offload)


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


def write_set(
    args: argparse.Namespace,
    command: str,
    spec: Any,
    *,
    prompts: list[str],
    make: Callable[[list[int] | None, Any], Any],
    **details: Any,
) -> None:
    """Make the images that `--out` lacks under a progress bar, writing each as it is decoded (see `make_set`), and
    print `--out`.

    Args:
        args: The command's arguments (`--out`, `--overwrite`: replace the set in `--out` if it is another one; the
            new set takes its place only when complete).
        command: The command that makes the set (`"generate"`, `"transfer"`), for its sidecar and grid title.
        spec: The resolved set.
        prompts: The prompt of every image, the references first.
        make: Makes some images of the set (see `generate_set`'s `images`), reporting to the progress it is given.
        details: What the sidecar adds to the spec (see `set_files.sidecar`), the request included.
    """
    from style_aligned.pipeline.set_files import SetFolder, make_set, set_title, sidecar

    title = set_title(command, spec.seed)
    folder = SetFolder(args.out, sidecar(command, spec, prompts, **details), title=title, overwrite=args.overwrite)
    if folder.complete:
        say_complete(args.out)
        return
    bar = ProgressBar(f"{len(folder.missing)} of {len(folder.names)} images")
    try:
        make_set(folder, spec.plan(), make, progress=bar)
    finally:
        bar.close()
    print(args.out)
