"""A cheap preview of a latent: a linear map of its channels (4, FLUX.1's 16) to RGB, no autoencoder call."""

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from style_aligned.options import ModelKind

_FLUX_RGB = (
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    [-0.0329, -0.0718, -0.0851],
)
LATENT_RGB: dict[ModelKind, tuple[list[list[float]], list[float]]] = {
    "sd1": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
    "flux_dev": _FLUX_RGB,
    "flux_schnell": _FLUX_RGB,
}
"""Per model kind, the channels x 3 factors and the bias that map a scaled latent to RGB in about [-1, 1] (the linear
factors that ComfyUI's previews use)."""


def latent_preview(
    latent: Float[Tensor, "1 channels latent_height latent_width"], kind: ModelKind, max_size: int = 384
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
