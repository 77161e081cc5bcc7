"""Random-weight FLUX.1 models in the diffusers layout, their inputs, and the calls of both implementations."""

from typing import Any

import torch
from diffusers import FluxTransformer2DModel  # type: ignore[import-untyped]

from style_aligned.flux import FluxConfig, FluxTransformer, image_ids, text_ids
from tests.helpers.diffusers_models import build

TINY = FluxConfig(
    num_layers=2,
    num_single_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
"""A FLUX.1 transformer a few MB large, for fast tests."""

REDUCED = FluxConfig(num_layers=2, num_single_layers=4)
"""FLUX.1 [dev] at full width (24 heads of 128, text 4096, pooled 768), with 2 double and 4 single blocks: 1.31 B
parameters, 5.2 GB in float32."""


def diffusers_transformer(config: FluxConfig, seed: int = 20) -> Any:
    return build(lambda: FluxTransformer2DModel(**config.to_diffusers()), seed)


def transformer_inputs(
    config: FluxConfig, batch_size: int = 2, size: int = 8, text_tokens: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for one call on `size`x`size` latents (`size`/2 squared tokens); timesteps as sigmas."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch_size, (size // 2) ** 2, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch_size, text_tokens, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=generator),
        "timestep": torch.rand(batch_size, generator=generator),
        "img_ids": image_ids(size, size),
        "txt_ids": text_ids(text_tokens),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch_size,), 3.5)
    return inputs


@torch.no_grad()
def run_diffusers(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).sample


@torch.no_grad()
def run_refiners(model: FluxTransformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Set the call's context (reset after every call) and run the Refiners transformer."""
    model.set_timestep(timestep=inputs["timestep"] * 1000)  # diffusers multiplies the sigma by 1000 inside
    if "guidance" in inputs:
        model.set_guidance(guidance=inputs["guidance"])
    model.set_text_embedding(text_embedding=inputs["encoder_hidden_states"])
    model.set_pooled_text_embedding(pooled_text_embedding=inputs["pooled_projections"])
    model.set_text_ids(text_ids=inputs["txt_ids"])
    model.set_image_ids(image_ids=inputs["img_ids"])
    return model(inputs["hidden_states"])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Max abs diff, and it over the max abs of the expected output."""
    difference = (actual - expected).abs().max().item()
    return difference, difference / expected.abs().max().item()


def replace_config(config: FluxConfig, **changes: Any) -> FluxConfig:
    from dataclasses import replace

    return replace(config, **changes)


def tiny_refiners(seed: int = 3) -> FluxTransformer:
    from style_aligned.weights.random_weights import build_random

    return build_random(lambda: FluxTransformer(TINY), seed=seed)
