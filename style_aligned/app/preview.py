"""A cheap preview of a latent: a linear map of its 4 channels to RGB, no autoencoder call."""

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from style_aligned.options import ModelKind

LATENT_RGB: dict[ModelKind, tuple[list[list[float]], list[float]]] = {
    "sd1": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
}
"""Per model kind, the 4x3 factors and the bias that map a scaled latent to RGB in about [-1, 1] (the linear factors
that ComfyUI's previews use)."""


def latent_preview(
    latent: Float[Tensor, "1 4 latent_height latent_width"], kind: ModelKind, max_size: int = 384
) -> Image.Image:
    """An approximate image of a latent.

    Args:
        latent: A scaled latent (as the denoising loop holds it).
        kind: The model kind.
        max_size: The largest side of the preview, in pixels (at most 8 times the latent's).

    Returns:
        An RGB image with the latent's aspect ratio.
    """
    factors, bias = LATENT_RGB[kind]
    weight = torch.tensor(factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent[0].detach().to(device="cpu", dtype=torch.float32), weight)
    rgb = rgb + torch.tensor(bias)[:, None, None]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(pixels, "RGB")
    height, width = latent.shape[-2:]
    scale = min(8.0, max_size / max(width, height))
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
