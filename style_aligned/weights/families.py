"""Which family a model reference names, SD1/SDXL or FLUX.1, told from small files before any weights are read, and
loading the models a set runs on: a Stable Diffusion pipeline or FLUX.1's models."""

import json
from pathlib import Path

import torch

from style_aligned.flux.models import FluxModels
from style_aligned.options import ModelKind
from style_aligned.weights import flux_loading, loading
from style_aligned.weights.flux import BFL_PREFIX
from style_aligned.weights.flux_convert import converted_flux_index, is_converted_flux
from style_aligned.weights.hub import parse_repo_id, resolve_folder
from style_aligned.weights.loading import StableDiffusion
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError

FLUX_PIPELINES: dict[ModelKind, str] = {
    "flux_dev": "black-forest-labs/FLUX.1-dev",
    "flux_schnell": "black-forest-labs/FLUX.1-schnell",
}
"""The pipeline that gives a FLUX.1 transformer file its text encoders, autoencoder and schedule."""


def flux_kind(reference: str | Path) -> ModelKind | None:
    """`"flux_dev"` or `"flux_schnell"` if the reference names a FLUX.1 model (a Hub id of a `FluxPipeline` repo, a
    diffusers folder, a folder written by `convert`, a transformer file in Black Forest Labs' or diffusers' layout),
    told from its `model_index.json` and transformer `config.json`, its `flux.json`, or a file's tensor names; None
    otherwise (an SD1 or SDXL model,
    or a reference that loading will report: a Hub id that cannot be fetched now).
    """
    path = Path(reference).expanduser()
    if path.is_file():
        return _file_kind(path)
    if not path.exists():
        if parse_repo_id(str(reference)) is None:
            return None
        try:
            path = resolve_folder(reference, ["model_index.json", "transformer/config.json"])
        except WeightsError:
            return None
    if is_converted_flux(path):
        guidance = converted_flux_index(path)["transformer"].get("guidance_embeds", True)
        return "flux_dev" if guidance else "flux_schnell"
    index = path / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()).get("_class_name") != "FluxPipeline":
        return None
    config = path / "transformer" / "config.json"
    guidance = json.loads(config.read_text()).get("guidance_embeds", False) if config.is_file() else True
    return "flux_dev" if guidance else "flux_schnell"


def _file_kind(path: Path) -> ModelKind | None:
    if path.suffix != ".safetensors":
        return None
    with SafetensorsReader(path) as reader:
        names = [key.removeprefix(BFL_PREFIX) for key in reader.keys()]
    if not any(name.startswith(("double_blocks.", "single_transformer_blocks.")) for name in names):
        return None
    guidance = any(name.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for name in names)
    return "flux_dev" if guidance else "flux_schnell"


def load_models(
    reference: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | str | None = None,
    offload: bool = False,
) -> StableDiffusion | FluxModels:
    """Load the models a set runs on, whatever the family (see `flux_kind`).

    Args:
        reference: An SD1 or SDXL model (see `load_pipeline`), or a FLUX.1 one (see `load_flux`; a transformer file
            takes the rest from the Black Forest Labs pipeline of its kind, `FLUX_PIPELINES`).
        device: Where the models run.
        dtype: The floating-point dtype of the models.
        cache_dir: Where `load_pipeline` keeps the conversion of an SD1 or SDXL diffusers folder or single file.
        offload: For FLUX.1, load on the CPU and keep only the models of each stage on `device` (see
            `FluxModels.offload`).

    Raises:
        WeightsError: If the model cannot be found, fetched or read.
        ValueError: If `offload` is asked for an SD1 or SDXL model.
    """
    kind = flux_kind(reference)
    if kind is None:
        if offload:
            raise ValueError("model offload is for FLUX.1 models; SD1 and SDXL fit the accelerator whole")
        return loading.load_pipeline(reference, device=device, dtype=dtype, cache_dir=cache_dir)
    components = FLUX_PIPELINES[kind] if Path(reference).expanduser().is_file() else None
    where = "cpu" if offload else device
    models = flux_loading.load_flux(reference, device=where, dtype=dtype, components=components)
    if offload:
        models.offload(device)
    return models
