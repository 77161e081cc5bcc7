"""Options, layer choice and misuse of StyleAlignedAdapter, on U-Nets built on the meta device (no weights)."""

import math
from types import SimpleNamespace
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet

from style_aligned import SharedAttentionAdapter, SharedGroupNormAdapter, StyleAlignedAdapter, self_attention_layers
from style_aligned.adapters.unet_layers import unshared_by_level
from style_aligned.options import StyleAlignedOptions


@pytest.fixture(scope="module")
def meta_sdxl() -> SDXLUNet:
    with torch.device("meta"):
        return SDXLUNet(in_channels=4)


@pytest.fixture(scope="module")
def meta_sd1() -> SD1UNet:
    with torch.device("meta"):
        return SD1UNet(in_channels=4)


def structure(unet: fl.Chain) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in unet.named_modules()]


def shared_indices(adapter: StyleAlignedAdapter[Any]) -> list[int]:
    return [layer.index for layer in adapter.shared_layers]


def test_only_self_level_spreads_unshared_layers_like_the_reference() -> None:
    # Level l <= 0.5 leaves unshared the multiples of n // int(l * n); above 0.5 the complement of level 1 - l.
    assert unshared_by_level(70, 0.0) == [False] * 70
    assert unshared_by_level(70, 1.0) == [True] * 70
    assert [i for i, u in enumerate(unshared_by_level(70, 0.3)) if u] == list(range(0, 70, 3))
    assert [i for i, u in enumerate(unshared_by_level(70, 0.8)) if not u] == list(range(0, 70, 5))
    assert [i for i, u in enumerate(unshared_by_level(16, 0.5)) if u] == list(range(0, 16, 2))
    assert unshared_by_level(16, 0.01) == [False] * 16  # too small to pick a layer: all shared
    assert unshared_by_level(16, 0.99) == [True] * 16


def test_layer_choice_by_level_index_and_block(meta_sdxl: SDXLUNet) -> None:
    layers = self_attention_layers(meta_sdxl)
    assert len(shared_indices(StyleAlignedAdapter(meta_sdxl, StyleAlignedOptions(only_self_level=0.3)))) == 70 - 24
    assert shared_indices(StyleAlignedAdapter(meta_sdxl, StyleAlignedOptions(shared_layers=[3, 0, 69]))) == [0, 3, 69]
    up = StyleAlignedAdapter(meta_sdxl, StyleAlignedOptions(shared_blocks=["up"]))
    assert shared_indices(up) == [layer.index for layer in layers if layer.block == "up"] == list(range(34, 70))
    up.inject()
    try:
        adapted = {id(adapter.target) for adapter in meta_sdxl.layers(SharedAttentionAdapter)}
        assert len(adapted) == 36
        assert all(
            any(isinstance(m, SharedAttentionAdapter) for m in layer.layer) == (layer.block == "up") for layer in layers
        )
    finally:
        up.eject()


def test_group_norm_sharing_is_independent_of_the_layer_choice(meta_sd1: SD1UNet) -> None:
    adapter = StyleAlignedAdapter(meta_sd1, StyleAlignedOptions(share_group_norm=True, only_self_level=1.0)).inject()
    try:
        assert sum(1 for _ in meta_sd1.layers(SharedAttentionAdapter)) == 0
        assert sum(1 for _ in meta_sd1.layers(SharedGroupNormAdapter)) == 61
    finally:
        adapter.eject()


@pytest.mark.parametrize(
    "options",
    [
        {"only_self_level": 1.5},
        {"only_self_level": -0.1},
        {"shared_score_scale": 0.0},
        {"shared_score_scale": -1.0},
        {"shared_score_scale": math.nan},
        {"shared_score_shift": math.inf},
        {"shared_layers": [0, 70]},
        {"shared_layers": [-1]},
        {"shared_blocks": ["down", "left"]},
        {"only_self_level": 0.5, "shared_blocks": ["up"]},
        {"shared_layers": [1], "shared_blocks": ["up"]},
        {"full_attention_share": True, "shared_score_shift": 1.0},
        {"full_attention_share": True, "shared_score_scale": 0.5},
    ],
)
def test_options_out_of_range_are_refused(meta_sdxl: SDXLUNet, options: dict[str, Any]) -> None:
    before = structure(meta_sdxl)
    with pytest.raises(ValueError) as error:
        StyleAlignedAdapter(meta_sdxl, StyleAlignedOptions(**options))
    assert any(name in str(error.value) for name in options)
    assert structure(meta_sdxl) == before


def test_misuse_is_refused_and_leaves_the_unet_as_it_was(meta_sdxl: SDXLUNet) -> None:
    before = structure(meta_sdxl)
    adapter = StyleAlignedAdapter(meta_sdxl, StyleAlignedOptions(share_group_norm=True))
    other = StyleAlignedAdapter(meta_sdxl)
    with pytest.raises(RuntimeError, match="not injected"):
        adapter.eject()
    adapter.inject()
    injected = structure(meta_sdxl)
    with pytest.raises(RuntimeError, match="already injected"):
        adapter.inject()
    with pytest.raises(RuntimeError, match="already injected"):
        other.inject()
    with pytest.raises(RuntimeError, match="already injected"):
        StyleAlignedAdapter(meta_sdxl)
    with pytest.raises(ValueError, match="shared_score_scale"):
        adapter.shared_score_scale = -1.0
    with pytest.raises(ValueError, match="shared_score_shift"):
        adapter.shared_score_shift = math.nan
    assert (adapter.shared_score_scale, adapter.shared_score_shift) == (1.0, 0.0)
    assert structure(meta_sdxl) == injected
    adapter.eject()
    assert structure(meta_sdxl) == before
    with pytest.raises(RuntimeError, match="not injected"):
        adapter.eject()
    assert structure(meta_sdxl) == before


def test_targets_that_are_not_unets_are_refused(meta_sdxl: SDXLUNet) -> None:
    with pytest.raises(TypeError, match=r"pass its `\.unet`"):
        StyleAlignedAdapter(SimpleNamespace(unet=meta_sdxl))  # type: ignore[type-var]
    with torch.device("meta"):
        text_encoder = CLIPTextEncoderL()
    with pytest.raises(TypeError, match="SD1UNet or SDXLUNet"):
        StyleAlignedAdapter(text_encoder)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="SD1UNet or SDXLUNet"):
        StyleAlignedAdapter(fl.Chain(fl.SelfAttention(embedding_dim=8)))  # type: ignore[type-var]
