"""FLUX.1 in this project's converted layout, and back: one Refiners file per Refiners model, T5 as transformers
keeps it, and `flux.json` (the models' configurations, the schedule, the text length).

```text
DST/
    flux.json                  written last: a folder without it is not a converted FLUX.1
    transformer.safetensors    FluxTransformer's state dict (metadata: model flux_transformer)
    autoencoder.safetensors    FluxAutoencoder's (flux_autoencoder)
    text_encoder.safetensors   CLIP L as Refiners' CLIPTextEncoderL (sd1_text_encoder, SD1's CLIP L)
    text_encoder_2/            T5 (transformers' safetensors)
    tokenizer_2/
```
"""

import dataclasses
import json
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL

from style_aligned.flux.autoencoder import AutoencoderConfig, FluxAutoencoder
from style_aligned.flux.config import FluxConfig
from style_aligned.flux.models import FluxModels
from style_aligned.flux.text_encoders import T5TextEncoder
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.weights.loading import load_model
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError, write_safetensors

FLUX_INDEX = "flux.json"
"""The file that makes a folder a converted FLUX.1 (written last)."""
FILES = {
    "transformer": ("transformer.safetensors", "flux_transformer"),
    "autoencoder": ("autoencoder.safetensors", "flux_autoencoder"),
    "clip_text_encoder": ("text_encoder.safetensors", "sd1_text_encoder"),
}
"""Each Refiners model's file and the model kind its metadata records."""
T5_FOLDERS = ("text_encoder_2", "tokenizer_2")


def is_converted_flux(path: Path) -> bool:
    """Whether `path` is a folder written by `save_flux`."""
    return (path / FLUX_INDEX).is_file()


def converted_flux_index(path: Path) -> dict[str, Any]:
    """The `flux.json` of a converted FLUX.1 folder."""
    return json.loads((path / FLUX_INDEX).read_text())


def save_flux(
    models: FluxModels,
    destination: Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write FLUX.1's models in the converted layout, each tensor streamed (in `dtype`, default: as it is).

    Raises:
        WeightsError: If the models lack their text encoders, or `destination` holds files and `overwrite` is not
            given.
    """
    if models.t5 is None or models.clip_text_encoder is None:
        raise WeightsError("a converted FLUX.1 holds its text encoders: load them (text_encoders=True)")
    outputs = [destination / name for name, _ in FILES.values()] + [destination / FLUX_INDEX]
    if not overwrite and (existing := [str(path) for path in outputs if path.exists()]):
        raise WeightsError(f"{', '.join(existing)} already exist (pass overwrite=True / --overwrite to replace)")
    destination.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    chains = {"transformer": models.transformer, "autoencoder": models.autoencoder}
    for name, model in (*chains.items(), ("clip_text_encoder", models.clip_text_encoder)):
        filename, kind = FILES[name]
        if progress:
            progress(f"converting the FLUX.1 {name.replace('_', ' ')} to {destination / filename}")
        _write_state(model.state_dict(), destination / filename, kind=kind, dtype=dtype, source=models.reference)
        written.append(destination / filename)
    for folder, part in zip(T5_FOLDERS, (models.t5.model, models.t5.tokenizer), strict=True):
        shutil.rmtree(destination / folder, ignore_errors=True)
        part.save_pretrained(
            destination / folder, **({"safe_serialization": True} if folder.startswith("text") else {})
        )
        written.append(destination / folder)
    index = {
        "format": "style-aligned flux",
        "source": models.reference,
        "transformer": dataclasses.asdict(models.transformer.config),
        "autoencoder": dataclasses.asdict(models.autoencoder.config),
        "scheduler": models.scheduler,
        "max_sequence_length": models.t5.max_sequence_length,
    }
    (destination / FLUX_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, destination / FLUX_INDEX]


def _write_state(
    state: dict[str, torch.Tensor], path: Path, *, kind: str, dtype: torch.dtype | None, source: str
) -> None:
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    entries = [(key, cast(tensor[:0]).dtype, tuple(tensor.shape)) for key, tensor in state.items()]
    metadata = {
        "format": "refiners",
        "model": kind,
        "source": source,
        "dtype": str(entries[0][1]).removeprefix("torch."),
        "converter": f"style-aligned {version('style-aligned')}",
    }
    write_safetensors(path, entries, lambda key: cast(state[key]), metadata=metadata)


def read_flux(
    folder: Path, *, device: torch.device | str, dtype: torch.dtype, text_encoders: bool = True
) -> FluxModels:
    """Load FLUX.1's models from a folder written by `save_flux`.

    Raises:
        WeightsError: If a file is missing or does not fit its model.
    """
    index = converted_flux_index(folder)
    transformer_config = FluxConfig(
        **(index["transformer"] | {"axes_dims_rope": tuple(index["transformer"]["axes_dims_rope"])})
    )
    autoencoder_config = AutoencoderConfig(
        **(index["autoencoder"] | {"block_out_channels": tuple(index["autoencoder"]["block_out_channels"])})
    )
    transformer = _read_state(
        folder / FILES["transformer"][0], lambda: FluxTransformer(transformer_config), device, dtype
    )
    autoencoder = _read_state(
        folder / FILES["autoencoder"][0], lambda: FluxAutoencoder(autoencoder_config), device, dtype
    )
    assert isinstance(transformer, FluxTransformer) and isinstance(autoencoder, FluxAutoencoder)
    models = FluxModels(
        transformer=transformer, autoencoder=autoencoder, scheduler=index["scheduler"], reference=str(folder)
    )
    if text_encoders:
        clip = load_model(folder / FILES["clip_text_encoder"][0], device=device, dtype=dtype, kind="sd1_text_encoder")
        assert isinstance(clip, CLIPTextEncoderL)
        models.clip_text_encoder = clip
        length = int(index["max_sequence_length"])
        models.t5 = T5TextEncoder.from_pretrained(folder, max_sequence_length=length, device=device, dtype=dtype)
    return models


def _read_state(
    path: Path, build: Callable[[], torch.nn.Module], device: torch.device | str, dtype: torch.dtype
) -> torch.nn.Module:
    if not path.is_file():
        raise WeightsError(f"{path} is missing: the converted FLUX.1 folder is incomplete")
    with torch.device("meta"):
        model = build()
    with SafetensorsReader(path) as reader:
        expected = model.state_dict()
        if set(reader.keys()) != set(expected):
            raise WeightsError(f"{path} does not fit its model (its keys differ)")
        state = {key: reader.read(key).to(device=device, dtype=dtype) for key in reader.keys()}
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
