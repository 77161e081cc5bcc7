"""The layers of a U-Net that StyleAligned shares, and the choice of which self-attention layers to share."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import refiners.fluxion.layers as fl
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import unet as sd1_unet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import unet as sdxl_unet

from style_aligned.options import Block, StyleAlignedOptions

UNet = SD1UNet | SDXLUNet

T = TypeVar("T", bound=fl.Module)

DOWN_BLOCKS = (sd1_unet.DownBlocks, sdxl_unet.DownBlocks)
_BLOCK_TYPES: dict[Block, tuple[type[fl.Chain], ...]] = {
    "down": DOWN_BLOCKS,
    "mid": (sd1_unet.MiddleBlock, sdxl_unet.MiddleBlock),
    "up": (sd1_unet.UpBlocks, sdxl_unet.UpBlocks),
}


@dataclass(frozen=True)
class SelfAttentionLayer:
    """A self-attention layer of a U-Net.

    Attributes:
        index: Its position among the U-Net's self-attention layers, in the order they run.
        block: The U-Net block that holds it: `"down"`, `"mid"` or `"up"`.
        layer: The layer itself.
    """

    index: int
    block: Block
    layer: fl.SelfAttention


def check_unet(target: object) -> UNet:
    """Check that a target is a Stable Diffusion U-Net that has self-attention layers.

    Raises:
        TypeError: If it is not.
    """
    if isinstance(target, SD1UNet | SDXLUNet):
        if next(target.layers(fl.SelfAttention), None) is None:
            raise TypeError(f"StyleAligned needs a U-Net with self-attention layers; {type(target).__name__} has none")
        return target
    hint = " (pass its `.unet`)" if hasattr(target, "unet") else ""
    raise TypeError(f"StyleAligned adapts an SD1UNet or SDXLUNet, got {type(target).__name__}{hint}")


def own_layers(chain: fl.Chain, layer_type: type[T]) -> Iterator[tuple[T, fl.Chain]]:
    """Yield the layers of a type that lie on a chain's main path, with their parents, in running order.

    Side branches (`fl.Passthrough` chains: the timestep encoder, and the ControlNets or Control-LoRAs that other
    adapters insert) are not entered, so their layers are never shared.
    """
    for module in chain:
        if isinstance(module, layer_type):
            yield module, chain
        elif isinstance(module, fl.Chain) and not isinstance(module, fl.Passthrough):
            yield from own_layers(module, layer_type)


def self_attention_layers(unet: UNet) -> list[SelfAttentionLayer]:
    """List the self-attention layers of a U-Net (70 for SDXL, 16 for SD1), in the order they run."""
    return [
        SelfAttentionLayer(index=index, block=_block_of(layer), layer=layer)
        for index, (layer, _) in enumerate(own_layers(unet, fl.SelfAttention))
    ]


def _block_of(layer: fl.SelfAttention) -> Block:
    for parent in layer.get_parents():
        for block, types in _BLOCK_TYPES.items():
            if isinstance(parent, types):
                return block
    raise ValueError(f"{layer} is outside the down, mid and up blocks of its U-Net")


def unshared_by_level(num_layers: int, only_self_level: float) -> list[bool]:
    """Spread the layers left unshared by `only_self_level` evenly, as the reference implementation does.

    A level `l <= 0.5` leaves unshared the `int(l * n)` layers whose index is a multiple of `n // int(l * n)`; a
    level above 0.5 shares those of level `1 - l` and leaves the rest unshared. A level too small to pick one layer
    leaves nothing unshared (the reference implementation divides by zero there).

    Args:
        num_layers: The number of self-attention layers.
        only_self_level: The rough fraction of layers left unshared, in [0, 1].

    Returns:
        For each layer, whether it keeps its plain self-attention.
    """
    if only_self_level == 0:
        return [False] * num_layers
    if only_self_level == 1:
        return [True] * num_layers
    flip = only_self_level > 0.5
    level = 1 - only_self_level if flip else only_self_level
    num_picked = int(level * num_layers)
    picked = [num_picked > 0 and index % (num_layers // num_picked) == 0 for index in range(num_layers)]
    return [not p for p in picked] if flip else picked


def registration_order(layers: list[SelfAttentionLayer]) -> list[SelfAttentionLayer]:
    """The self-attention layers in diffusers' registration order (`unet.attn_processors`): down, up, then mid.

    This is the order in which the reference implementation counts layers for `only_self_level`.
    """
    return [layer for block in ("down", "up", "mid") for layer in layers if layer.block == block]


def swap_layers(layers: list[SelfAttentionLayer]) -> list[SelfAttentionLayer]:
    """The default layers of swap mode: the decoder's self-attention layers at its highest resolution with attention.

    Visual Style Prompting (arXiv 2402.12974) swaps self-attention in the late decoder layers only; the authors'
    code (naver-ai/Visual-Style-Prompting, `config/*.json`: `activate_layer_indices_list` `[[0, 0], [128, 140]]` of
    SDXL's 140 attention processors) swaps the 6 self-attention layers of diffusers' `up_blocks.1`, the last up
    block with attention (running indices 64 to 69 of 70). The same rule on SD1 gives the 3 self-attention layers of
    `up_blocks.3` (running indices 13 to 15 of 16): the up-block layers of the smallest width.
    """
    up = [layer for layer in layers if layer.block == "up"]
    if not up:
        return []
    width = min(layer.layer.embedding_dim for layer in up)
    return [layer for layer in up if layer.layer.embedding_dim == width]


def select_shared_layers(layers: list[SelfAttentionLayer], options: StyleAlignedOptions) -> list[SelfAttentionLayer]:
    """Choose the self-attention layers to share, by level, by index or by block (the options allow one way).

    Args:
        layers: All self-attention layers of the U-Net, as given by `self_attention_layers` (running order).
        options: `only_self_level` spreads the unshared layers evenly over the layers counted in diffusers'
            registration order (see `registration_order`), as the reference implementation does; `shared_layers`
            are indices in running order; `shared_blocks` names U-Net blocks. In swap mode, without another
            choice, the layers of `swap_layers`.

    Returns:
        The layers to share, in running order.

    Raises:
        ValueError: If a layer index is out of range for this U-Net.
    """
    if options.shared_layers is not None:
        indices = set(options.shared_layers)
        if unknown := sorted(i for i in indices if not 0 <= i < len(layers)):
            raise ValueError(
                f"shared_layers {unknown} out of range: this U-Net has {len(layers)} self-attention layers"
            )
        return [layer for layer in layers if layer.index in indices]
    if options.shared_blocks is not None:
        return [layer for layer in layers if layer.block in options.shared_blocks]
    if options.attention_mode == "swap" and options.only_self_level == 0:
        return swap_layers(layers)
    ordered = registration_order(layers)
    level = options.only_self_level
    unshared = {layer.index for layer, off in zip(ordered, unshared_by_level(len(ordered), level), strict=True) if off}
    return [layer for layer in layers if layer.index not in unshared]
