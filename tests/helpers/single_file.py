"""Single-file checkpoints in the original Stability layout, written from a diffusers folder, and their oracle.

The writer streams one tensor at a time (the files are as large as the pipeline). That the files really are in the
original layout is checked by diffusers' own single-file loading (`from_single_file` with a local config), which
this project's code does not use.
"""

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES
from style_aligned.weights.convert import canonical_key, weight_files
from style_aligned.weights.original_layout import Origin, original_key
from style_aligned.weights.safetensors_io import write_safetensors


def diffusers_tensors(pipeline: Path, kind: str) -> dict[str, tuple[Path, str]]:
    """Each `component/key` of a diffusers pipeline folder (text encoder keys with `text_model.`), with its file and
    key in that file."""
    found: dict[str, tuple[Path, str]] = {}
    for name in PIPELINES[kind]:
        for component in ARCHITECTURES[name].configs:
            for file in weight_files(pipeline / component):
                with safe_open(str(file), framework="pt") as handle:  # pyright: ignore[reportUnknownMemberType]
                    for key in handle.keys():
                        found[f"{component}/{canonical_key(component, key)}"] = (file, key)
    return found


def write_single_file(pipeline: Path, kind: str, path: Path) -> None:
    """Write a diffusers SD1 or SDXL pipeline folder as one `.safetensors` file in the original layout."""
    sources = diffusers_tensors(pipeline, kind)
    parts: dict[str, list[tuple[Origin, str]]] = {}
    for key in sources:
        origin = original_key(kind, key)
        parts.setdefault(origin.key, []).append((origin, key))

    handles: dict[Path, Any] = {file: safe_open(str(file), framework="pt") for file, _ in sources.values()}

    def read(key: str) -> torch.Tensor:
        file, name = sources[key]
        return handles[file].get_tensor(name)

    def produce(original: str) -> torch.Tensor:
        pieces = sorted(parts[original], key=lambda item: item[0].part)
        origin = pieces[0][0]
        if origin.op == "chunk":
            return torch.cat([read(key) for _, key in pieces])
        tensor = read(pieces[0][1])
        if origin.op == "reshape":
            return tensor.reshape(*tensor.shape, 1, 1)
        if origin.op == "transpose":
            return tensor.T.contiguous()
        return tensor

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for original, pieces in parts.items():
        origin, key = pieces[0]
        file, name = sources[key]
        shape = tuple(handles[file].get_slice(name).get_shape())
        entries.append((original, torch.float32, origin.original_shape(shape)))
    write_safetensors(path, entries, produce, metadata={"format": "pt"})


def oracle_models(path: Path, pipeline: Path, kind: str) -> dict[str, Any]:
    """Load each component of a single file with diffusers' own single-file code (config from the diffusers folder).

    Returns a generator-like dict of loaders, so that a caller holds one model at a time.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # type: ignore[import-untyped]
    from diffusers.loaders.single_file_utils import (  # type: ignore[import-untyped]
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # type: ignore[import-untyped]

    def clip(model_class: Any, subfolder: str) -> Any:
        checkpoint = load_single_file_checkpoint(str(path))
        return create_diffusers_clip_model_from_ldm(
            model_class, checkpoint, subfolder=subfolder, config=str(pipeline), local_files_only=True
        )

    loaders: dict[str, Any] = {
        "unet": lambda: UNet2DConditionModel.from_single_file(
            str(path), config=str(pipeline), subfolder="unet", local_files_only=True
        ),
        "vae": lambda: AutoencoderKL.from_single_file(
            str(path), config=str(pipeline), subfolder="vae", local_files_only=True
        ),
        "text_encoder": lambda: clip(CLIPTextModel, "text_encoder"),
    }
    if kind == "sdxl":
        loaders["text_encoder_2"] = lambda: clip(CLIPTextModelWithProjection, "text_encoder_2")
    return loaders


def assert_equals_folder(model: Any, pipeline: Path, component: str) -> int:
    """Assert that a diffusers model's weights equal those saved in a pipeline folder's component; returns the count
    of tensors compared."""
    state = {canonical_key(component, key): value for key, value in model.state_dict().items()}
    compared = 0
    for file in weight_files(pipeline / component):
        with safe_open(str(file), framework="pt") as handle:  # pyright: ignore[reportUnknownMemberType]
            for key in handle.keys():
                name = canonical_key(component, key)
                assert name in state, f"{component}: {name} not loaded by diffusers"
                assert torch.equal(state[name], handle.get_tensor(key)), f"{component}: {name} differs"
                compared += 1
    return compared
