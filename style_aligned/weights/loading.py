"""Build ready Refiners models from converted files, or straight from a diffusers folder.

Models are built empty (on the meta device, without initialisation, see `empty`) and receive their tensors by
assignment, one tensor read at a time through a memory map: loading holds one copy of the weights, on the chosen
device and dtype. They are loaded for inference: in eval mode, with
gradients off (call `requires_grad_(True)` on a model to train it).
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import refiners.fluxion.layers as fl
import torch
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.solvers import DDIM
from torch import Tensor

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES, Architecture
from style_aligned.weights.convert import convert, open_sources
from style_aligned.weights.empty import build_empty
from style_aligned.weights.hub import resolve_file, resolve_model
from style_aligned.weights.original_layout import is_single_file
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError

StableDiffusion = StableDiffusion_XL | StableDiffusion_1


def build_model(
    architecture: Architecture,
    keys: list[str],
    read: Callable[[str], Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    origin: str,
) -> fl.Chain:
    """Build an architecture's model on the meta device and assign it the tensors `read` gives for `keys`.

    Raises:
        WeightsError: If the keys or shapes do not fit the model.
    """
    model = build_empty(architecture.build)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{origin} does not fit the {architecture.description}: missing keys {missing[:8]}, unexpected keys"
            f" {unexpected[:8]}"
        )
    state: dict[str, Tensor] = {}
    for key in keys:
        tensor = read(key)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(f"{origin}: {key} is {list(tensor.shape)}, expected {list(expected[key].shape)}")
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def converted_file_kind(path: Path | str) -> str:
    """The model kind recorded in a converted file's metadata (e.g. `"sdxl_unet"`).

    Raises:
        WeightsError: If the file is not a converted Refiners model file.
    """
    with SafetensorsReader(path) as reader:
        kind = reader.metadata.get("model", "")
    if kind not in ARCHITECTURES:
        raise WeightsError(
            f"{path} is not a model file converted by style-aligned (no known model kind in its metadata)"
        )
    return kind


def load_model(
    path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, kind: str | None = None
) -> fl.Chain:
    """Load a converted Refiners model file.

    Args:
        path: A `.safetensors` file written by `convert` (its metadata tells the model kind), or such a file on the
            Hub as `org/name[@revision]/path/in/repo.safetensors`.
        device: Where to put the model.
        dtype: The floating-point dtype of the model.
        kind: The model kind expected (e.g. `"sdxl_unet"`); an error if the file holds another.

    Raises:
        WeightsError: If the file is not a valid converted model of the expected kind.
    """
    path = resolve_file(path)
    found = converted_file_kind(path)
    if kind is not None and found != kind:
        raise WeightsError(
            f"{path} holds the weights of the {ARCHITECTURES[found].description}, not of the"
            f" {ARCHITECTURES[kind].description}"
        )
    with SafetensorsReader(path) as reader:
        return build_model(
            ARCHITECTURES[found], reader.keys(), reader.read, device=device, dtype=dtype, origin=str(path)
        )


def _pipeline(
    kind: str, models: dict[str, fl.Chain], device: torch.device | str, dtype: torch.dtype
) -> StableDiffusion:
    unet, text_encoder, autoencoder = (models[name] for name in PIPELINES[kind])
    solver = DDIM(num_inference_steps=50)
    model_class = StableDiffusion_XL if kind == "sdxl" else StableDiffusion_1
    return model_class(
        unet=unet,  # type: ignore[arg-type]
        clip_text_encoder=text_encoder,  # type: ignore[arg-type]
        lda=autoencoder,  # type: ignore[arg-type]
        solver=solver,
        device=device,
        dtype=dtype,
    )


def load_pipeline(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: Path | str | None = None,
) -> StableDiffusion:
    """Build a ready `StableDiffusion_XL` or `StableDiffusion_1` from wherever the model is kept.

    Args:
        path: A folder written by `convert` (`unet.safetensors`, `text_encoder.safetensors`,
            `autoencoder.safetensors`); a diffusers pipeline folder (with `model_index.json`) or a single-file
            checkpoint in the original Stability layout (SD1.x or SDXL `.safetensors`), converted on the fly; or a
            Hugging Face Hub repo id `org/name[@revision]`, fetched through `huggingface_hub` (only the configs and
            safetensors weights of the components used; the fp16 variant when `dtype` is half precision).
        device: Where to put the models.
        dtype: The floating-point dtype of the models.
        cache_dir: For a diffusers folder or a single file, keep the converted files here and reuse them next time.

    Returns:
        The pipeline, with a 50-step DDIM solver.

    Raises:
        WeightsError: If the model cannot be found or fetched, or is not a complete, valid SD1 or SDXL pipeline.
    """
    resolved = resolve_model(path, half=dtype in (torch.float16, torch.bfloat16))
    path = resolved.path
    if (path / "model_index.json").is_file() or is_single_file(path):
        if cache_dir is not None:
            digest = hashlib.sha1(f"{path.resolve()}:{resolved.variant}".encode()).hexdigest()[:8]
            cached = Path(cache_dir) / f"{path.resolve().name}-{digest}"
            if not (cached / "unet.safetensors").is_file():
                convert(path, cached, overwrite=True, variant=resolved.variant)
            return load_pipeline(cached, device=device, dtype=dtype)
        models: dict[str, fl.Chain] = {}
        with open_sources(path, resolved.variant) as sources:
            for source in sources:
                keys = [key for key, _, _ in source.entries()]
                architecture = source.architecture
                models[architecture.name] = build_model(
                    architecture, keys, source.read, device=device, dtype=dtype, origin=str(path)
                )
        kind = "sdxl" if "sdxl_unet" in models else "sd1"
        return _pipeline(kind, models, device, dtype)

    unet_file = path / "unet.safetensors"
    if not unet_file.is_file():
        raise WeightsError(
            f"{path} holds neither converted weights (unet.safetensors), a diffusers pipeline (model_index.json),"
            " nor is it a single-file checkpoint"
        )
    kind = converted_file_kind(unet_file).removesuffix("_unet")
    if kind not in PIPELINES:
        raise WeightsError(f"{unet_file} is not the U-Net of an SD1 or SDXL pipeline")
    models = {}
    for name in PIPELINES[kind]:
        file = path / ARCHITECTURES[name].filename
        if not file.is_file():
            raise WeightsError(f"{path} lacks {file.name}: the {ARCHITECTURES[name].description} is missing")
        models[name] = load_model(file, device=device, dtype=dtype, kind=name)
    return _pipeline(kind, models, device, dtype)
