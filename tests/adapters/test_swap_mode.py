"""Swap mode (Visual Style Prompting): its default layers, its options, and its place in the option record."""

import pytest
import torch
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet

from style_aligned import SharedGroupNormAdapter, StyleAlignedAdapter, StyleAlignedOptions
from style_aligned.adapters.unet_layers import self_attention_layers
from style_aligned.cli import build_parser
from style_aligned.evaluation.sweep import parse_grid
from style_aligned.options import option_fields, parse_option

# The authors' code swaps SDXL's attention processors 128 to 140 of 140 (diffusers' order: attn1 and attn2 of every
# transformer block, down, mid, then up blocks): the self-attention of `up_blocks.1` (3 transformers of depth 2).
PAPER_LAYERS = {"sdxl": list(range(64, 70)), "sd1": [13, 14, 15]}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def meta_unet(request: pytest.FixtureRequest) -> SD1UNet | SDXLUNet:
    with torch.device("meta"):
        return SD1UNet(in_channels=4) if request.param == "sd1" else SDXLUNet(in_channels=4)


def test_swap_defaults_to_the_papers_layers(meta_unet: SD1UNet | SDXLUNet) -> None:
    kind = "sdxl" if isinstance(meta_unet, SDXLUNet) else "sd1"
    adapter = StyleAlignedAdapter(meta_unet, StyleAlignedOptions(attention_mode="swap"))
    indices = [layer.index for layer in adapter.shared_layers]
    assert indices == PAPER_LAYERS[kind]
    layers = self_attention_layers(meta_unet)
    assert all(layers[i].block == "up" for i in indices)
    assert {layers[i].layer.embedding_dim for i in indices} == {640 if kind == "sdxl" else 320}
    assert indices[-1] == len(layers) - 1  # the last self-attention layers of the decoder
    assert not adapter.options.share_group_norm  # swap mode shares no GroupNorm by default


def test_swap_chooses_layers_the_same_way_as_concat(meta_unet: SD1UNet | SDXLUNet) -> None:
    for choice in ({"shared_blocks": ("mid",)}, {"shared_layers": (0, 3)}, {"only_self_level": 0.5}):
        concat = StyleAlignedAdapter(meta_unet, StyleAlignedOptions(**choice))  # type: ignore[arg-type]
        swap = StyleAlignedAdapter(meta_unet, StyleAlignedOptions(attention_mode="swap", **choice))  # type: ignore[arg-type]
        assert [layer.index for layer in swap.shared_layers] == [layer.index for layer in concat.shared_layers]


def test_inject_and_eject_restore_the_structure(meta_unet: SD1UNet | SDXLUNet) -> None:
    before = repr(meta_unet)
    keys = list(meta_unet.state_dict())
    adapter = StyleAlignedAdapter(meta_unet, StyleAlignedOptions(attention_mode="swap", share_group_norm=True))
    adapter.inject()
    assert repr(meta_unet) != before and list(meta_unet.layers(SharedGroupNormAdapter))
    adapter.eject()
    assert repr(meta_unet) == before and list(meta_unet.state_dict()) == keys


def test_attention_mode_is_an_option_of_the_command_line_the_sweep_and_the_sidecar() -> None:
    field = next(f for f in option_fields() if f.name == "attention_mode")
    assert field.choices == ("concat", "swap") and field.default == "concat" and not field.many
    assert "Visual Style Prompting" in StyleAlignedOptions.help("attention_mode")
    for command in ("generate", "transfer", "panorama"):
        args = build_parser().parse_args(
            [command, "--model", "m", "--prompt", "p", "--out", "o", "--attention-mode", "swap"]
        )
        assert args.attention_mode == "swap"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o", "--attention-mode", "x"])
    assert parse_option("attention_mode", "swap") == "swap"
    assert parse_grid(["attention_mode=concat,swap"]) == [{"attention_mode": "concat"}, {"attention_mode": "swap"}]
    options = StyleAlignedOptions(attention_mode="swap")
    assert options.to_dict()["attention_mode"] == "swap"
    assert StyleAlignedOptions.from_dict(options.to_dict()) == options
