"""Loading a whole FLUX.1 pipeline's models from a Hub id, a diffusers folder, or Black Forest Labs' single files.

Every Refiners model is built on the meta device and assigned the tensors read from memory-mapped safetensors files
(`assign=True`): in the weights' own dtype nothing is copied, so loading holds one copy of the weights. T5-XXL is
transformers' `T5EncoderModel`, loaded by transformers (the `flux` extra).
"""

import json
from pathlib import Path
from typing import Any

import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL

from style_aligned.flux.models import FluxModels
from style_aligned.flux.text_encoders import DEV_MAX_SEQUENCE_LENGTH, SCHNELL_MAX_SEQUENCE_LENGTH, T5TextEncoder
from style_aligned.weights.architectures import ARCHITECTURES
from style_aligned.weights.convert import ModelSource
from style_aligned.weights.flux import load_flux_autoencoder, load_flux_transformer
from style_aligned.weights.flux_convert import is_converted_flux, read_flux
from style_aligned.weights.hub import resolve_model
from style_aligned.weights.loading import build_model
from style_aligned.weights.safetensors_io import WeightsError


def load_clip_text_encoder(folder: Path, *, device: torch.device | str, dtype: torch.dtype) -> CLIPTextEncoderL:
    """Load FLUX.1's CLIP L from a transformers `text_encoder/` folder into Refiners' `CLIPTextEncoderL`.

    Raises:
        WeightsError: If the folder is not a CLIP L text encoder with safetensors weights.
    """
    architecture = ARCHITECTURES["sd1_text_encoder"]  # the same CLIP L as SD1's
    with ModelSource(architecture, {"text_encoder": folder}) as source:
        keys = [key for key, _, _ in source.entries()]
        model = build_model(architecture, keys, source.read, device=device, dtype=dtype, origin=str(folder))
    assert isinstance(model, CLIPTextEncoderL)
    return model


def _pipeline_folder(reference: str | Path, *, without: tuple[str, ...] = ()) -> tuple[Path, str]:
    resolved = resolve_model(reference, without=without)
    folder = resolved.path
    index = folder / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()).get("_class_name") != "FluxPipeline":
        raise WeightsError(f"{reference} is not a FLUX.1 diffusers pipeline (a FluxPipeline model_index.json)")
    return folder, resolved.reference


def load_flux(
    reference: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    components: str | Path | None = None,
    autoencoder: str | Path | None = None,
    text_encoders: bool = True,
) -> FluxModels:
    """Load FLUX.1's models, in eval mode with gradients off.

    Args:
        reference: A Hub id (`black-forest-labs/FLUX.1-schnell`, `black-forest-labs/FLUX.1-dev@REVISION`), a
            diffusers FLUX.1 pipeline folder, a folder written by `convert` (see `flux_convert`), or Black Forest Labs'
            transformer file (`flux1-dev.safetensors`, also a
            diffusers-layout transformer file).
        device: Where to put the models.
        dtype: The floating-point dtype of the models (FLUX.1 is published in bfloat16).
        components: For a transformer file, the diffusers pipeline (Hub id or folder) that gives the text encoders,
            the autoencoder and the schedule; its transformer is not fetched.
        autoencoder: The autoencoder to use instead of the pipeline's: a `vae/` folder or a file, in the diffusers
            layout or Black Forest Labs' `ae.safetensors`.
        text_encoders: Whether to load CLIP L and T5 (False: only the transformer and the autoencoder).

    Raises:
        WeightsError: If a model cannot be found, fetched or read as FLUX.1's.
    """
    path = Path(reference).expanduser()
    if path.is_dir() and is_converted_flux(path):
        return read_flux(path, device=device, dtype=dtype, text_encoders=text_encoders)
    if path.is_file():
        if components is None and (text_encoders or autoencoder is None):
            raise WeightsError(
                f"{path} holds only the transformer: name the pipeline for the text encoders and the autoencoder"
                " (components=black-forest-labs/FLUX.1-dev or a diffusers folder)"
            )
        transformer = load_flux_transformer(path, device=device, dtype=dtype)
        folder, name = (
            (None, str(path)) if components is None else _pipeline_folder(components, without=("transformer",))
        )
    else:
        folder, name = _pipeline_folder(reference)
        transformer = load_flux_transformer(folder / "transformer", device=device, dtype=dtype)
    vae = autoencoder if autoencoder is not None else folder / "vae" if folder is not None else None
    assert vae is not None  # a file without components has an autoencoder (checked above)
    ae = load_flux_autoencoder(vae, device=device, dtype=dtype)
    scheduler: dict[str, Any] = {}
    models = FluxModels(transformer=transformer, autoencoder=ae, reference=name)
    if folder is None:
        return models
    if (scheduler_file := folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = json.loads(scheduler_file.read_text())
    models.scheduler = scheduler
    if text_encoders:
        models.clip_text_encoder = load_clip_text_encoder(folder / "text_encoder", device=device, dtype=dtype)
        length = SCHNELL_MAX_SEQUENCE_LENGTH if models.is_schnell else DEV_MAX_SEQUENCE_LENGTH
        models.t5 = T5TextEncoder.from_pretrained(folder, max_sequence_length=length, device=device, dtype=dtype)
    return models
