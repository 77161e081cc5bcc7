"""StyleAlignedAdapter without classifier-free guidance on full-size random SD1 and SDXL U-Nets, against the
independent implementation (`spec_reference`) put in place of every shared layer."""

import math
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet, StableDiffusion_1
from torch import Tensor

from style_aligned import StyleAlignedAdapter, self_attention_layers
from style_aligned.adapters.unet_layers import own_layers
from style_aligned.options import StyleAlignedOptions, model_kind
from tests.helpers import models
from tests.helpers import spec_reference as spec
from tests.helpers.compare import assert_close

OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"share_group_norm": True, "shared_score_shift": math.log(2), "shared_score_scale": 0.8},
]


class SpecAttention(fl.Module):
    """The independent implementation of shared attention, without classifier-free guidance."""

    def __init__(self, num_heads: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.options = {k: v for k, v in options.items() if k in ("shared_score_shift", "shared_score_scale")}

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        attended = spec.shared_attention(
            query, key, value, self.num_heads, classifier_free_guidance=False, **self.options
        )
        return attended.to(query.dtype)


class SpecGroupNorm(fl.Module):
    def __init__(self, norm: fl.GroupNorm) -> None:
        super().__init__()
        self.norm = [norm]

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm[0]
        return spec.shared_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, False).to(x.dtype)


@pytest.fixture(scope="module")
def sd1_unet(sd1_random: StableDiffusion_1) -> SD1UNet:
    return sd1_random.unet


def with_spec_layers(unet: SD1UNet | SDXLUNet, options: dict[str, Any], inputs: dict[str, Tensor]) -> Tensor:
    """The U-Net's output with the independent implementation in every self-attention (and GroupNorm) layer."""
    swaps: list[tuple[fl.Chain, fl.Module, fl.Module]] = []
    for shared in self_attention_layers(unet):
        attention = shared.layer.ensure_find(fl.ScaledDotProductAttention)
        swaps.append((shared.layer, attention, SpecAttention(attention.num_heads, options)))
    if StyleAlignedOptions(**options).resolved(model_kind(unet)).share_group_norm:  # SD1 shares it by default
        swaps += [(parent, norm, SpecGroupNorm(norm)) for norm, parent in own_layers(unet, fl.GroupNorm)]
    for parent, old, new in swaps:
        parent.replace(old, new)
    try:
        return models.run_unet(unet, inputs)
    finally:
        for parent, old, new in swaps:
            parent.replace(new, old)


@pytest.mark.parametrize("options", OPTION_SETS, ids=["defaults", "group-norm-shift-scale"])
def test_sd1_adapter_without_guidance_equals_the_independent_implementation(
    sd1_unet: SD1UNet, options: dict[str, Any]
) -> None:
    check_against_independent_implementation(sd1_unet, options)


def test_sdxl_adapter_equals_the_independent_implementation_and_strength_zero_the_plain_unet(
    sdxl_unet: SDXLUNet,
) -> None:
    inputs, _, plain = check_against_independent_implementation(sdxl_unet, OPTION_SETS[1])
    options = StyleAlignedOptions(**OPTION_SETS[1], strength=0.0)  # strength 1 is the options' default, checked above
    adapter = StyleAlignedAdapter(sdxl_unet, options, classifier_free_guidance=False).inject()
    try:
        assert torch.equal(models.run_unet(sdxl_unet, inputs), plain)
    finally:
        adapter.eject()


def check_against_independent_implementation(
    unet: SD1UNet | SDXLUNet, options: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Check the adapter against the independent implementation; returns the inputs, the adapter's output and the
    plain U-Net's."""
    # SD1 attends at the 1/8, 1/16 and 1/32 levels and in the middle (1/64): 16x16 latents give every layer 4 tokens
    # or more (AdaIN's unbiased variance needs 2)
    inputs = models.unet_inputs(unet, batch_size=3, size=16 if isinstance(unet, SD1UNet) else 8, seed=5)
    expected = with_spec_layers(unet, options, inputs)
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(**options), classifier_free_guidance=False).inject()
    try:
        output = models.run_unet(unet, inputs)
    finally:
        adapter.eject()
    assert_close(output, expected, tolerance=1e-5)
    plain = models.run_unet(unet, inputs)
    assert_close(output[:1], plain[:1], tolerance=1e-5)  # the reference keeps its plain output
    assert (output[1:] - plain[1:]).abs().max().item() > 1e-3
    return inputs, output, plain
