"""The Stable Diffusion models a set runs on, and what the pipeline needs to know of them."""

from collections.abc import Generator
from contextlib import contextmanager

import torch
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.lcm import SDXLLcmAdapter

StableDiffusion = StableDiffusion_XL | StableDiffusion_1


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
