"""FLUX.1 as Refiners models: the transformer, the 16-channel autoencoder, the text encoders and the solver."""

from style_aligned.flux.autoencoder import FLUX_AUTOENCODER, AutoencoderConfig, FluxAutoencoder
from style_aligned.flux.config import FLUX_DEV, FLUX_SCHNELL, FluxConfig
from style_aligned.flux.latents import image_ids, pack_latents, text_ids, unpack_latents
from style_aligned.flux.solver import FlowMatchEuler, calculate_shift, flow_sigmas
from style_aligned.flux.text_encoders import T5TextEncoder, clip_pooled_text_embedding
from style_aligned.flux.transformer import FluxTransformer

__all__ = [
    "FLUX_AUTOENCODER",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "AutoencoderConfig",
    "FlowMatchEuler",
    "FluxAutoencoder",
    "FluxConfig",
    "FluxTransformer",
    "T5TextEncoder",
    "calculate_shift",
    "clip_pooled_text_embedding",
    "flow_sigmas",
    "image_ids",
    "pack_latents",
    "text_ids",
    "unpack_latents",
]
