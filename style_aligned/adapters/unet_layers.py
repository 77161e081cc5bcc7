"""The layers of a U-Net that StyleAligned shares, and the choice of which self-attention layers to share."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import refiners.fluxion.layers as fl
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import unet as sd1_unet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import unet as sdxl_unet

Block = Literal["down", "mid", "up"]
BLOCKS: tuple[Block, ...] = get_args(Block)
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


def select_shared_layers(
    layers: list[SelfAttentionLayer],
    only_self_level: float = 0.0,
    shared_layers: Iterable[int] | None = None,
    shared_blocks: Iterable[Block] | None = None,
) -> list[SelfAttentionLayer]:
    """Choose the self-attention layers to share, by level, by index or by block (one way at a time).

    Args:
        layers: All self-attention layers of the U-Net, as given by `self_attention_layers`.
        only_self_level: The rough fraction of layers left unshared, spread evenly (0 shares all).
        shared_layers: The indices of the layers to share.
        shared_blocks: The U-Net blocks whose layers to share: `"down"`, `"mid"`, `"up"`.

    Returns:
        The layers to share.

    Raises:
        ValueError: If an option is out of range or more than one way of choosing is used.
    """
    if not 0.0 <= only_self_level <= 1.0:
        raise ValueError(f"only_self_level must be in [0, 1], got {only_self_level}")
    ways = [only_self_level != 0.0, shared_layers is not None, shared_blocks is not None]
    if sum(ways) > 1:
        raise ValueError("choose the shared layers one way: only_self_level, shared_layers or shared_blocks")
    if shared_layers is not None:
        indices = set(shared_layers)
        if unknown := sorted(i for i in indices if not 0 <= i < len(layers)):
            raise ValueError(
                f"shared_layers {unknown} out of range: this U-Net has {len(layers)} self-attention layers"
            )
        return [layer for layer in layers if layer.index in indices]
    if shared_blocks is not None:
        blocks = set(shared_blocks)
        if unknown_blocks := sorted(blocks - set(BLOCKS)):
            raise ValueError(f"unknown shared_blocks {unknown_blocks}: choose among {list(BLOCKS)}")
        return [layer for layer in layers if layer.block in blocks]
    unshared = unshared_by_level(len(layers), only_self_level)
    return [layer for layer in layers if not unshared[layer.index]]
