"""FLUX.1 latents as tokens: 16-channel latents packed 2x2 into 64-channel tokens, and the tokens' rotary ids."""

import torch
from jaxtyping import Float
from torch import Tensor


def pack_latents(latents: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch tokens channels*4"]:
    """Pack each 2x2 patch of latents into one token, row by row (diffusers' `FluxPipeline._pack_latents`).

    Raises:
        ValueError: If the latents' height or width is odd.
    """
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latents of {height}x{width} cannot be packed 2x2: both sides must be even")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(
    tokens: Float[Tensor, "batch tokens channels*4"], height: int, width: int
) -> Float[Tensor, "batch channels height width"]:
    """Unpack tokens into latents of the given height and width (the inverse of `pack_latents`).

    Raises:
        ValueError: If the tokens do not fill latents of that size.
    """
    batch, count, packed = tokens.shape
    if height % 2 or width % 2 or count != (height // 2) * (width // 2) or packed % 4:
        raise ValueError(f"{count} tokens of {packed} channels do not unpack into latents of {height}x{width}")
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def image_ids(height: int, width: int, device: torch.device | str | None = None) -> Float[Tensor, "tokens 3"]:
    """The rotary ids of the tokens of packed latents: token (r, c) has ids (0, r, c).

    Args:
        height: The height of the latents (twice the rows of tokens).
        width: The width of the latents (twice the columns of tokens).
        device: Where to put the ids.
    """
    rows, columns = height // 2, width // 2
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)


def text_ids(length: int, device: torch.device | str | None = None) -> Float[Tensor, "tokens 3"]:
    """The rotary ids of the text tokens: all zero."""
    return torch.zeros(length, 3, device=device)
