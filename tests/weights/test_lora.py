"""LoRA files in the kohya, peft and diffusers layouts, placed by key; parity with weights merged in diffusers."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel  # type: ignore[import-untyped]
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # type: ignore[import-untyped]
from refiners.fluxion.adapters.lora import LoraAdapter
from refiners.foundationals.latent_diffusion import SDXLUNet, StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import DoubleTextEncoder
from transformers import CLIPTextModel  # type: ignore[import-untyped]

from style_aligned import StyleAlignedAdapter
from style_aligned.weights.architectures import ARCHITECTURES
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.lora import LoraError, LoraManager, load_lora_file, sgm_unet_modules
from style_aligned.weights.safetensors_io import write_safetensors
from tests.helpers.compare import assert_close

RANK = 4
UNET_LAYERS = [  # (diffusers module, kohya alpha or None)
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", None),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 8.0),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", None),
    ("down_blocks.1.attentions.1.proj_in", 1.0),  # 1x1 convolution in SD1
    ("down_blocks.0.resnets.1.conv1", 4.0),  # 3x3 convolution (LoCon)
    ("down_blocks.0.downsamplers.0.conv", None),  # 3x3 convolution, stride 2
    ("up_blocks.0.resnets.2.time_emb_proj", 2.0),
]
TEXT_LAYERS = [("text_model.encoder.layers.3.self_attn.q_proj", 2.0), ("text_model.encoder.layers.7.mlp.fc1", None)]


def lora_weights(model: torch.nn.Module, layers: list[tuple[str, float | None]], seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, Any] = {}
    modules = transformers_names(model)
    for name, alpha in layers:
        weight = modules[name].weight
        if weight.ndim == 4:
            down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], RANK, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.1
        weights[name] = (down, up, alpha)
    return weights


def transformers_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module names as published checkpoints write them (transformers 5 drops CLIPTextModel's `text_model.`)."""
    modules = dict(model.named_modules())
    if isinstance(model, CLIPTextModel) and "text_model" not in modules:
        modules |= {f"text_model.{name}": module for name, module in modules.items()}
    return modules


def kohya(weights: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in weights.items():
        key = f"lora_{prefix}_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def peft(weights: dict[str, Any], component: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, _) in weights.items():
        tensors[f"{component}.{name}.lora_A.weight"], tensors[f"{component}.{name}.lora_B.weight"] = down, up
    return tensors


@contextmanager
def merged(model: torch.nn.Module, weights: dict[str, Any], scale: float, use_alpha: bool) -> Iterator[None]:
    """Add the LoRA updates to the model's weights, yield, then restore them."""
    modules = transformers_names(model)
    saved = {name: modules[name].weight.clone() for name in weights}
    with torch.no_grad():
        for name, (down, up, alpha) in weights.items():
            factor = scale * (alpha / RANK if use_alpha and alpha is not None else 1.0)
            delta = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) if down.ndim == 4 else up @ down
            modules[name].weight += factor * delta
    yield
    with torch.no_grad():
        for name, weight in saved.items():
            modules[name].weight.copy_(weight)


@pytest.fixture(scope="module")
def sd1(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


def unet_output(sd: StableDiffusion_1, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        sd.unet.set_timestep(inputs["timestep"])
        sd.unet.set_clip_text_embedding(inputs["embedding"])
        return sd.unet(inputs["x"])


def text_output(sd: StableDiffusion_1, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return sd.clip_text_encoder[1:](inputs["tokens"])


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_matches_weights_merged_in_diffusers(
    sd1: StableDiffusion_1, sd1_source: dict[str, Any], tmp_path: Path, layout: str
) -> None:
    inputs = sd1_source["inputs"]
    unet = UNet2DConditionModel.from_pretrained(sd1_source["pipeline"] / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(sd1_source["pipeline"] / "text_encoder").eval()
    unet_weights = lora_weights(unet, UNET_LAYERS, seed=1)
    text_weights = lora_weights(text_encoder, TEXT_LAYERS, seed=2)
    if layout == "kohya":
        tensors = kohya(unet_weights, "unet") | kohya(text_weights, "te")
    else:
        tensors = peft(unet_weights, "unet") | peft(text_weights, "text_encoder")
    file = tmp_path / "lora.safetensors"
    write_safetensors(file, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__)

    scale = 0.7
    with torch.no_grad():
        with merged(unet, unet_weights, scale, use_alpha=layout == "kohya"):
            expected_unet = unet(inputs["x"], inputs["timestep"], inputs["embedding"]).sample
        with merged(text_encoder, text_weights, scale, use_alpha=layout == "kohya"):
            expected_text = text_encoder(inputs["tokens"]).last_hidden_state
    del unet, text_encoder

    plain = unet_output(sd1, inputs)
    manager = LoraManager(sd1)
    manager.add_loras("style", tensors=load_lora_file(file), scale=scale)
    try:
        assert sum(1 for _ in sd1.unet.layers(LoraAdapter)) == len(UNET_LAYERS)
        assert manager.names == ["style"] and manager.get_scale("style") == scale
        assert_close(unet_output(sd1, inputs), expected_unet)
        assert_close(text_output(sd1, inputs), expected_text)
    finally:
        manager.remove_loras("style")
    assert not list(sd1.unet.layers(LoraAdapter)) and not list(sd1.clip_text_encoder.layers(LoraAdapter))
    assert torch.equal(unet_output(sd1, inputs), plain)


def test_lora_after_style_aligned_and_stacked_loras(sd1: StableDiffusion_1, sd1_source: dict[str, Any]) -> None:
    inputs = sd1_source["inputs"]
    with torch.device("meta"):
        reference_unet = UNet2DConditionModel(**ARCHITECTURES["sd1_unet"].configs["unet"])
    first = kohya(lora_weights(reference_unet, UNET_LAYERS, seed=3), "unet")
    second = peft(lora_weights(reference_unet, UNET_LAYERS[:3], seed=4), "unet")
    manager = LoraManager(sd1)

    manager.add_loras("first", tensors=first)
    manager.add_loras("second", tensors=second, scale=0.5)  # shares layers with the first
    adapter = StyleAlignedAdapter(sd1.unet).inject()
    loras_then_style_aligned = unet_output(sd1, inputs)
    adapter.eject()
    manager.remove_all()

    adapter.inject()
    manager.add_loras("first", tensors=first)
    manager.add_loras("second", tensors=second, scale=0.5)
    assert sum(1 for _ in sd1.unet.layers(LoraAdapter)) == len(UNET_LAYERS)
    assert torch.equal(unet_output(sd1, inputs), loras_then_style_aligned)
    manager.remove_all()
    adapter.eject()


def test_keys_that_match_nothing_are_listed_and_nothing_is_attached(sd1: StableDiffusion_1) -> None:
    with torch.device("meta"):
        reference_unet = UNet2DConditionModel(**ARCHITECTURES["sd1_unet"].configs["unet"])
    tensors = kohya(lora_weights(reference_unet, UNET_LAYERS[:2], seed=5), "unet")
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 320)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(320, 4)
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 4)
    tensors["lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight"] = torch.zeros(4, 640, 1, 1)  # no up
    tensors["some_other_format.hada_w1_a"] = torch.zeros(2)
    manager = LoraManager(sd1)
    with pytest.raises(LoraError) as error:
        manager.add_loras("broken", tensors=tensors)
    message = str(error.value)
    assert "6 keys that match no layer of this SD1 model" in message
    for key in ("down_blocks_9", "lora_te2_", "up_blocks_1_attentions_0_proj_out", "some_other_format.hada_w1_a"):
        assert key in message
    assert not list(sd1.unet.layers(LoraAdapter)) and manager.names == []


def test_original_unet_names_round_trip_through_diffusers_converter() -> None:
    """kohya's SDXL LoRAs name U-Net layers as the original (SGM) code does; check our names against diffusers'."""
    for name in ("sdxl_unet", "sd1_unet"):
        architecture = ARCHITECTURES[name]
        key_map, _ = load_key_map(architecture.key_map)
        original = sgm_unet_modules(architecture)
        checkpoint: dict[str, torch.Tensor] = {}
        for index, key in enumerate(key_map):
            module, parameter = key.rsplit(".", 1)
            checkpoint[f"model.diffusion_model.{original[module]}.{parameter}"] = torch.tensor([float(index)])
        converted = convert_ldm_unet_checkpoint(checkpoint, dict(architecture.configs["unet"]))
        assert {key: int(value.item()) for key, value in converted.items()} == {
            key: index for index, key in enumerate(key_map)
        }


def test_sdxl_kohya_original_names_and_diffusers_names_place_alike() -> None:
    with torch.device("meta"):
        unet, text_encoder, lda = SDXLUNet(in_channels=4), DoubleTextEncoder(), SDXLAutoencoder()
    sd = StableDiffusion_XL(unet=unet, clip_text_encoder=text_encoder, lda=lda, device="meta")
    architecture = ARCHITECTURES["sdxl_unet"]
    key_map, _ = load_key_map(architecture.key_map)
    original = sgm_unet_modules(architecture)
    layers = [m for m in original if m.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "op"))]
    expected = {id(unet.get_submodule(key_map[f"{m}.weight"][0].removesuffix(".weight"))) for m in layers}
    for names in (original, {m: m for m in original}):  # original (SGM) names, then diffusers names
        tensors: dict[str, torch.Tensor] = {}
        for module in layers:
            shape = key_map[f"{module}.weight"][1]
            key = f"lora_unet_{names[module].replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = torch.zeros(RANK, *shape[1:])
            tensors[f"{key}.lora_up.weight"] = torch.zeros(shape[0], RANK, *([1, 1] if len(shape) == 4 else []))
        manager = LoraManager(sd)
        manager.add_loras("lora", tensors=tensors)
        assert {id(adapter.target) for adapter in unet.layers(LoraAdapter)} == expected
        manager.remove_all()
    assert len(expected) == len(layers) > 200
