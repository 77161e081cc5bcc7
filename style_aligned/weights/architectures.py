"""The model architectures that can be converted: their diffusers layout, configuration and Refiners model."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import refiners.fluxion.layers as fl
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.controlnet import Controlnet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import SD1Autoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import DoubleTextEncoder

from style_aligned.weights.controlnet_xl import SDXLControlnet


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A model that can be converted from the diffusers layout to Refiners.

    Attributes:
        name: The model kind, as written in converted files' metadata (e.g. `"sdxl_unet"`).
        description: A human-readable name.
        configs: For each source folder, the diffusers or transformers constructor arguments of the source model.
        checked: The configuration fields compared with a source folder's `config.json` before converting.
        key_map: The name of the key map (in `style_aligned/key_maps/`) from source keys to Refiners keys.
        build: Builds the Refiners model (call it under `empty.empty_init` to allocate and initialise nothing).
        filename: The name of its file in a converted folder.
    """

    name: str
    description: str
    configs: dict[str, dict[str, Any]]
    checked: tuple[str, ...]
    key_map: str
    build: Callable[[], fl.Chain]
    filename: str


_SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
)
_SD1_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    attention_head_dim=8,
    cross_attention_dim=768,
)
_UNET_CHECKED = (
    "in_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "transformer_layers_per_block",
    "use_linear_projection",
)
_CLIP_L: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
_CLIP_G: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
)
_CLIP_CHECKED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_AUTOENCODER: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
_AUTOENCODER_CHECKED = ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types")
_SD1_CONTROLNET: dict[str, Any] = {
    key: value for key, value in _SD1_UNET.items() if key not in ("sample_size", "out_channels", "up_block_types")
} | {"conditioning_channels": 3}


_SDXL_CONTROLNET: dict[str, Any] = {
    key: value for key, value in _SDXL_UNET.items() if key not in ("sample_size", "out_channels", "up_block_types")
} | {"conditioning_channels": 3}
_CONTROLNET_CHECKED = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "conditioning_channels",
    "addition_embed_type",
    "transformer_layers_per_block",
)


def _sdxl_unet() -> fl.Chain:
    return SDXLUNet(in_channels=4)


def _sd1_unet() -> fl.Chain:
    return SD1UNet(in_channels=4)


def _sd1_controlnet() -> fl.Chain:
    return Controlnet(name="controlnet")


def _sdxl_controlnet() -> fl.Chain:
    return SDXLControlnet(name="controlnet")


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="sdxl_unet",
            description="SDXL U-Net",
            configs={"unet": _SDXL_UNET},
            checked=_UNET_CHECKED,
            key_map="sdxl_unet",
            build=_sdxl_unet,
            filename="unet.safetensors",
        ),
        Architecture(
            name="sd1_unet",
            description="SD1 U-Net",
            configs={"unet": _SD1_UNET},
            checked=_UNET_CHECKED,
            key_map="sd1_unet",
            build=_sd1_unet,
            filename="unet.safetensors",
        ),
        Architecture(
            name="sdxl_text_encoder",
            description="SDXL text encoders (CLIP L and G)",
            configs={"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G},
            checked=_CLIP_CHECKED,
            key_map="sdxl_text_encoder",
            build=DoubleTextEncoder,
            filename="text_encoder.safetensors",
        ),
        Architecture(
            name="sd1_text_encoder",
            description="SD1 text encoder (CLIP L)",
            configs={"text_encoder": _CLIP_L},
            checked=_CLIP_CHECKED,
            key_map="sd1_text_encoder",
            build=CLIPTextEncoderL,
            filename="text_encoder.safetensors",
        ),
        Architecture(
            name="sdxl_autoencoder",
            description="SDXL autoencoder",
            configs={"vae": _AUTOENCODER},
            checked=_AUTOENCODER_CHECKED,
            key_map="autoencoder",
            build=SDXLAutoencoder,
            filename="autoencoder.safetensors",
        ),
        Architecture(
            name="sd1_autoencoder",
            description="SD1 autoencoder",
            configs={"vae": _AUTOENCODER},
            checked=_AUTOENCODER_CHECKED,
            key_map="autoencoder",
            build=SD1Autoencoder,
            filename="autoencoder.safetensors",
        ),
        Architecture(
            name="sd1_controlnet",
            description="SD1 ControlNet",
            configs={".": _SD1_CONTROLNET},
            checked=_CONTROLNET_CHECKED,
            key_map="sd1_controlnet",
            build=_sd1_controlnet,
            filename="controlnet.safetensors",
        ),
        Architecture(
            name="sdxl_controlnet",
            description="SDXL ControlNet",
            configs={".": _SDXL_CONTROLNET},
            checked=_CONTROLNET_CHECKED,
            key_map="sdxl_controlnet",
            build=_sdxl_controlnet,
            filename="controlnet.safetensors",
        ),
    )
}
"""Every convertible architecture, by name."""

PIPELINES: dict[str, tuple[str, ...]] = {
    "sdxl": ("sdxl_unet", "sdxl_text_encoder", "sdxl_autoencoder"),
    "sd1": ("sd1_unet", "sd1_text_encoder", "sd1_autoencoder"),
}
"""The architectures making up each pipeline kind."""
