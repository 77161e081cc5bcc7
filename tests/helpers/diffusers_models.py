"""Random-weight diffusers and transformers models in full-size configurations, saved in the diffusers layout."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # type: ignore[import-untyped]
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # type: ignore[import-untyped]

from style_aligned.weights.architectures import ARCHITECTURES
from style_aligned.weights.random_weights import fill_random_

CONFIGS = {name: architecture.configs for name, architecture in ARCHITECTURES.items()}


def build(factory: Callable[[], torch.nn.Module], seed: int) -> Any:
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    fill_random_(model, seed)
    for name, buffer in model.named_buffers():
        if name.endswith("position_ids"):  # transformers' non-persistent index buffer
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval()


def unet(kind: str, seed: int = 10) -> UNet2DConditionModel:
    return build(lambda: UNet2DConditionModel(**CONFIGS[f"{kind}_unet"]["unet"]), seed)


def vae(seed: int = 11) -> AutoencoderKL:
    return build(lambda: AutoencoderKL(**CONFIGS["sd1_autoencoder"]["vae"]), seed)


def text_encoder(config_name: str, kind: str, seed: int = 12) -> CLIPTextModel:
    config = CLIPTextConfig(**CONFIGS[f"{kind}_text_encoder"][config_name])
    model_class = CLIPTextModelWithProjection if config_name == "text_encoder_2" else CLIPTextModel
    return build(lambda: model_class(config), seed)


def controlnet(kind: str = "sd1", seed: int = 13) -> ControlNetModel:
    return build(lambda: ControlNetModel(**CONFIGS[f"{kind}_controlnet"]["."]), seed)


def write_model_index(folder: Path, kind: str) -> None:
    pipeline = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    components["text_encoder"] = ["transformers", "CLIPTextModel"]
    if kind == "sdxl":
        components["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))


def save(model: Any, folder: Path) -> None:
    """Save in the diffusers/transformers layout (safetensors); the caller drops the model afterwards."""
    model.save_pretrained(folder, safe_serialization=True)
