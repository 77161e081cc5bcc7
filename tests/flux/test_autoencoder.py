"""The FLUX.1 autoencoder equals diffusers' `AutoencoderKL` in FLUX.1's configuration, loaded by the shipped key map."""

import torch
from diffusers import AutoencoderKL  # type: ignore[import-untyped]

from style_aligned.flux import FLUX_AUTOENCODER
from style_aligned.weights.flux import load_flux_autoencoder
from tests.helpers.diffusers_models import build
from tests.helpers.flux import relative_error


@torch.no_grad()
def test_autoencoder_equals_diffusers() -> None:
    source = build(lambda: AutoencoderKL(**FLUX_AUTOENCODER.to_diffusers()), seed=21)
    model = load_flux_autoencoder(source.state_dict())
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(2, 16, 4, 4, generator=generator)
    scale, shift = FLUX_AUTOENCODER.scaling_factor, FLUX_AUTOENCODER.shift_factor
    expected_latents = (source.encode(image).latent_dist.mean - shift) * scale
    expected_image = source.decode(latents / scale + shift).sample
    assert relative_error(model.encode(image), expected_latents)[1] < 1e-5
    assert relative_error(model.decode(latents), expected_image)[1] < 1e-5
    assert model.encode(image).shape == (2, 16, 4, 4)
