"""The models a set runs on (a Stable Diffusion pipeline or FLUX.1's models), their kind, and what the pipeline needs
to know of them."""

from collections.abc import Generator
from contextlib import contextmanager

import torch
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.lcm import SDXLLcmAdapter

from style_aligned.flux.models import FluxModels
from style_aligned.options import ModelKind, model_kind

StableDiffusion = StableDiffusion_XL | StableDiffusion_1
Model = StableDiffusion | FluxModels
"""What `generate_set` runs on: a Refiners `StableDiffusion_XL` or `StableDiffusion_1`, or FLUX.1's `FluxModels`."""


def kind_of(model: Model | ModelKind) -> ModelKind:
    """The kind of a model (a kind is its own kind).

    Raises:
        TypeError: If the model is neither a Stable Diffusion pipeline nor FLUX.1's models.
    """
    if isinstance(model, str):
        return model
    if isinstance(model, FluxModels):
        return "flux_schnell" if model.is_schnell else "flux_dev"
    return model_kind(model)


def lcm_guidance_embedding(sd: StableDiffusion) -> SDXLLcmAdapter | None:
    """The LCM adapter of the model's U-Net (its guidance embedding), if one is injected."""
    parent = sd.unet.parent
    while parent is not None:
        if isinstance(parent, SDXLLcmAdapter):
            return parent
        parent = parent.parent
    return None


@contextmanager
def autoencoder_in_float32(sd: StableDiffusion) -> Generator[None]:
    """Run the autoencoder in float32 when the model is in half precision (the SDXL VAE overflows in float16)."""
    if sd.lda.dtype == torch.float32:
        yield
        return
    dtype = sd.lda.dtype
    sd.lda.to(dtype=torch.float32)
    try:
        yield
    finally:
        sd.lda.to(dtype=dtype)
