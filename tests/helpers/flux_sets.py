"""FLUX.1 models a few MB large, whole (text encoders, transformer, autoencoder, schedule), for fast tests of sets."""

from dataclasses import replace
from typing import Any

import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from transformers import T5EncoderModel  # type: ignore[import-untyped]

from style_aligned.flux import AutoencoderConfig, FluxAutoencoder, FluxTransformer, T5TextEncoder
from style_aligned.flux.models import FluxModels
from tests.helpers.flux import TINY
from tests.helpers.flux_pipeline import SCHEDULER, T5_CONFIG, t5_tokenizer

TINY_AUTOENCODER = AutoencoderConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
"""A FLUX.1-shaped autoencoder (16 latent channels, 8x down) a few MB large."""


@torch.no_grad()
def tiny_flux_models(*, schnell: bool = False, seed: int = 0, max_sequence_length: int = 16) -> FluxModels:
    """Random FLUX.1 models a few MB large: a small CLIP text encoder (pooled width 32), T5 and transformer, an
    autoencoder of FLUX.1's shape, and [dev]'s or [schnell]'s schedule."""
    torch.manual_seed(seed)
    clip: Any = CLIPTextEncoder(embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
    config = replace(TINY, pooled_projection_dim=32, joint_attention_dim=T5_CONFIG.d_model, guidance_embeds=not schnell)
    t5 = T5TextEncoder(T5EncoderModel(T5_CONFIG).eval(), t5_tokenizer(), max_sequence_length=max_sequence_length)
    scheduler = {"use_dynamic_shifting": False, "shift": 1.0} if schnell else dict(SCHEDULER)
    return FluxModels(
        transformer=FluxTransformer(config).eval(),
        autoencoder=FluxAutoencoder(TINY_AUTOENCODER).eval(),
        clip_text_encoder=clip.eval(),
        t5=t5,
        scheduler=scheduler,
        reference="tiny-flux",
    )
