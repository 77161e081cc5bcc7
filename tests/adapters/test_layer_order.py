"""`only_self_level` picks the layers the reference implementation picks: its rule over diffusers' registration order.

The diffusers U-Nets are built on the meta device: only their structure is needed.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel  # type: ignore[import-untyped]
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet

from style_aligned import StyleAlignedAdapter, StyleAlignedOptions, self_attention_layers
from style_aligned.weights.architectures import ARCHITECTURES

LEVELS = [0.1, 0.3, 0.5, 0.8, 0.9]
BLOCK_PREFIXES = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


def switch_vector(total: int, level: float) -> list[bool]:
    """The reference's rule (SPEC section 3): which of `total` layers keep plain self-attention at `level`."""
    if level == 0:
        return [False] * total
    if level == 1:
        return [True] * total
    flip = level > 0.5
    level = 1 - level if flip else level
    num_switch = int(level * total)
    vector = [index % (total // num_switch) == 0 for index in range(total)]
    return [not v for v in vector] if flip else vector


def diffusers_self_attention(kind: str) -> list[str]:
    """The self-attention processors of a diffusers U-Net, in `attn_processors` order."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[f"{kind}_unet"].configs["unet"])
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


def refiners_unet(kind: str) -> SD1UNet | SDXLUNet:
    with torch.device("meta"):
        return SDXLUNet(in_channels=4) if kind == "sdxl" else SD1UNet(in_channels=4)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_registration_order_is_down_up_mid(kind: str) -> None:
    names = diffusers_self_attention(kind)
    blocks = [BLOCK_PREFIXES[name.split(".")[0]] for name in names]
    counts = {"sd1": (6, 9, 1), "sdxl": (24, 36, 10)}[kind]
    assert blocks == ["down"] * counts[0] + ["up"] * counts[1] + ["mid"] * counts[2]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_level_shares_the_layers_the_reference_shares(kind: str, level: float) -> None:
    names = diffusers_self_attention(kind)
    unet = refiners_unet(kind)
    layers = self_attention_layers(unet)  # running order: down, mid, up
    by_block = {block: [layer.index for layer in layers if layer.block == block] for block in ("down", "mid", "up")}
    # the i-th layer of a block in diffusers' order is the i-th layer of that block in running order
    seen = {"down": 0, "mid": 0, "up": 0}
    expected: set[int] = set()
    for name, unshared in zip(names, switch_vector(len(names), level), strict=True):
        block = BLOCK_PREFIXES[name.split(".")[0]]
        index = by_block[block][seen[block]]
        seen[block] += 1
        if not unshared:
            expected.add(index)
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(only_self_level=level))
    assert {layer.index for layer in adapter.shared_layers} == expected
