"""Random-weight models built fast, for benchmarks and smoke tests that need no real checkpoint.

A full-size model is built empty (on the meta device, without initialisation), materialised, then filled from a small
seeded pool of normal values (scaled by `1 / sqrt(fan_in)`; norm weights 1, biases 0). An SDXL U-Net takes about a
third of the time of its regular initialisation, with identical results for the same seed.
"""

import math
from collections.abc import Callable
from typing import TypeVar

import torch

from style_aligned.weights.empty import build_empty

M = TypeVar("M", bound=torch.nn.Module)

_POOL_SIZE = 1 << 20
_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter and floating-point buffer of a module in place, deterministically.

    Args:
        module: The module; its tensors may be uninitialised (e.g. after `to_empty`).
        seed: The seed of the value pool.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_SIZE, generator=generator)
    norm_weights = {id(submodule.weight) for submodule in module.modules() if isinstance(submodule, _NORMS)}
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for index, (name, tensor) in enumerate(tensors):
        if not tensor.is_floating_point():
            continue
        if id(tensor) in norm_weights:
            tensor.fill_(1.0)
        elif tensor.ndim == 1 and name.endswith("bias"):
            tensor.zero_()
        else:
            fan_in = math.prod(tensor.shape[1:]) if tensor.ndim > 1 else tensor.numel()
            _tile_(tensor.view(-1), pool / math.sqrt(fan_in), start=(index * 7919) % _POOL_SIZE)


def _tile_(flat: torch.Tensor, pool: torch.Tensor, start: int) -> None:
    position, source = 0, start
    while position < flat.numel():
        count = min(flat.numel() - position, pool.numel() - source)
        flat[position : position + count].copy_(pool[source : source + count])
        position, source = position + count, 0


def build_random(
    factory: Callable[[], M],
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
) -> M:
    """Build a model with random weights without running its own initialisation.

    Args:
        factory: Builds the model (called under `empty_init`: on the meta device, without initialisation).
        seed: The seed of the weights.
        device: Where to materialise the model.
        dtype: The floating-point dtype of the model.

    Returns:
        The model, in eval mode, with gradients off.

    Example:
        ```py
        unet = build_random(lambda: SDXLUNet(in_channels=4))
        ```
    """
    model = build_empty(factory)
    model = model.to_empty(device=device).to(dtype=dtype)
    fill_random_(model, seed)
    return model.eval().requires_grad_(False)
