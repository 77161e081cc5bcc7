"""StyleAlignedAdapter on full-size random-weight SD1 and SDXL U-Nets."""

import math
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.layers.chain import ChainError
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet, StableDiffusion_1

from style_aligned import SharedAttentionAdapter, SharedGroupNormAdapter, StyleAlignedAdapter, self_attention_layers
from style_aligned.options import StyleAlignedOptions
from tests.helpers import models

TOLERANCE = 1e-5
LAYER_COUNTS = {"sd1": (16, 61), "sdxl": (70, 46)}  # self-attention layers, GroupNorm layers
BLOCK_COUNTS = {"sd1": {"down": 6, "mid": 1, "up": 9}, "sdxl": {"down": 24, "mid": 10, "up": 36}}
OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"share_group_norm": True, "shared_score_shift": math.log(2)},
    {"shared_score_scale": 0.5, "adain_values": True, "shared_score_shift": -0.5},
]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def meta_unet(request: pytest.FixtureRequest) -> tuple[str, SD1UNet | SDXLUNet]:
    """A U-Net of each kind on the meta device: its structure without its weights (no memory, built in seconds)."""
    with torch.device("meta"):
        return request.param, SD1UNet(in_channels=4) if request.param == "sd1" else SDXLUNet(in_channels=4)


@pytest.fixture(scope="module")
def unet(sd1_random: StableDiffusion_1) -> SD1UNet:
    """The full-size random SD1 U-Net: what the adapter computes does not depend on the U-Net's kind (its layers are
    the same on SDXL; SDXL's outputs are checked against the independent implementation in
    `test_unet_without_guidance.py`)."""
    return sd1_random.unet


@pytest.fixture(scope="module")
def baseline(unet: SD1UNet) -> dict[str, Any]:
    """Plain outputs for a CFG batch of 2 images (rows 0 and 2 are references) and of 1 image, and the state."""
    inputs = models.unet_inputs(unet, batch_size=4)
    single = models.unet_inputs(unet, batch_size=2, seed=1)
    return {
        "inputs": inputs,
        "output": models.run_unet(unet, inputs),
        "single_inputs": single,
        "single_output": models.run_unet(unet, single),
        "fingerprint": models.fingerprint(unet),
        "modules": [name for name, _ in unet.named_modules()],
    }


def count(unet: fl.Chain, layer_type: type[fl.Module]) -> int:
    return sum(1 for _ in unet.layers(layer_type))


def test_every_self_attention_and_group_norm_is_adapted(meta_unet: tuple[str, SD1UNet | SDXLUNet]) -> None:
    kind, unet = meta_unet
    num_attention, num_norms = LAYER_COUNTS[kind]
    assert count(unet, fl.SelfAttention) == num_attention
    blocks = [layer.block for layer in self_attention_layers(unet)]
    assert {block: blocks.count(block) for block in ("down", "mid", "up")} == BLOCK_COUNTS[kind]
    modules = [name for name, _ in unet.named_modules()]
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(share_group_norm=True)).inject()
    assert count(unet, SharedAttentionAdapter) == num_attention
    assert count(unet, SharedGroupNormAdapter) == num_norms
    adapter.eject()
    assert count(unet, SharedAttentionAdapter) == count(unet, SharedGroupNormAdapter) == 0
    assert [name for name, _ in unet.named_modules()] == modules


@pytest.mark.parametrize("options", OPTION_SETS, ids=["default", "transfer", "scaled"])
def test_references_keep_plain_output_and_targets_change(
    unet: SD1UNet, baseline: dict[str, Any], options: dict[str, Any]
) -> None:
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(**options)).inject()
    try:
        output = models.run_unet(unet, baseline["inputs"])
    finally:
        adapter.eject()
    plain = baseline["output"]
    assert (output[[0, 2]] - plain[[0, 2]]).abs().max().item() <= TOLERANCE
    assert (output[1] - plain[1]).abs().max().item() > 1e-3
    assert (output[3] - plain[3]).abs().max().item() > 1e-3


def test_one_image_with_guidance_equals_plain(unet: SD1UNet, baseline: dict[str, Any]) -> None:
    adapter = StyleAlignedAdapter(
        unet,
        StyleAlignedOptions(
            share_group_norm=True, adain_values=True, shared_score_scale=0.5, shared_score_shift=math.log(2)
        ),
    ).inject()
    try:
        output = models.run_unet(unet, baseline["single_inputs"])
    finally:
        adapter.eject()
    assert (output - baseline["single_output"]).abs().max().item() <= TOLERANCE


def test_eject_restores_outputs_and_state_exactly_after_twenty_injections(
    unet: SD1UNet, baseline: dict[str, Any]
) -> None:
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(share_group_norm=True, shared_score_shift=0.3)).inject()
    first = models.run_unet(unet, baseline["inputs"])
    assert not torch.equal(first, baseline["output"])
    adapter.eject()
    for _ in range(20):
        adapter.inject()
        adapter.eject()
    assert [name for name, _ in unet.named_modules()] == baseline["modules"]
    assert torch.equal(models.run_unet(unet, baseline["inputs"]), baseline["output"])
    adapter.inject()
    try:
        assert torch.equal(models.run_unet(unet, baseline["inputs"]), first)
    finally:
        adapter.eject()
    assert models.fingerprint(unet) == baseline["fingerprint"]


def test_only_self_level_one_equals_plain(unet: SD1UNet, baseline: dict[str, Any]) -> None:
    # no layer shared, and no GroupNorm either (the SD1 default shares it)
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(only_self_level=1.0, share_group_norm=False)).inject()
    try:
        assert count(unet, SharedAttentionAdapter) == 0
        assert torch.equal(models.run_unet(unet, baseline["inputs"]), baseline["output"])
    finally:
        adapter.eject()


def test_scale_and_shift_change_on_injected_adapter(unet: SD1UNet, baseline: dict[str, Any]) -> None:
    fresh = StyleAlignedAdapter(unet, StyleAlignedOptions(shared_score_scale=0.7, shared_score_shift=0.4)).inject()
    expected = models.run_unet(unet, baseline["inputs"])
    fresh.eject()
    adapter = StyleAlignedAdapter(unet).inject()
    try:
        adapter.shared_score_scale, adapter.shared_score_shift = 0.7, 0.4
        assert torch.equal(models.run_unet(unet, baseline["inputs"]), expected)
    finally:
        adapter.eject()


def run_with(unet: SD1UNet, inputs: dict[str, torch.Tensor], options: StyleAlignedOptions) -> torch.Tensor:
    adapter = StyleAlignedAdapter(unet, options).inject()
    try:
        return models.run_unet(unet, inputs)
    finally:
        adapter.eject()


STRENGTH_OPTIONS: dict[str, Any] = {**OPTION_SETS[1], **OPTION_SETS[2]}
"""Every layer that a strength moves: AdaIN on queries, keys and values, shared GroupNorm, a scale and a shift."""


@pytest.fixture(scope="module")
def method_output(unet: SD1UNet, baseline: dict[str, Any]) -> torch.Tensor:
    return run_with(unet, baseline["inputs"], StyleAlignedOptions(**STRENGTH_OPTIONS))


def test_strength_one_is_the_adapter_and_strength_zero_the_plain_unet(
    unet: SD1UNet, baseline: dict[str, Any], method_output: torch.Tensor
) -> None:
    inputs = baseline["inputs"]
    assert torch.equal(run_with(unet, inputs, StyleAlignedOptions(**STRENGTH_OPTIONS, strength=1.0)), method_output)
    assert torch.equal(
        run_with(unet, inputs, StyleAlignedOptions(**STRENGTH_OPTIONS, strength=0.0)), baseline["output"]
    )


def test_half_strength_keeps_the_references_and_moves_the_targets(
    unet: SD1UNet, baseline: dict[str, Any], method_output: torch.Tensor
) -> None:
    half = run_with(unet, baseline["inputs"], StyleAlignedOptions(**STRENGTH_OPTIONS, strength=0.5))
    plain = baseline["output"]
    assert torch.isfinite(half).all()
    assert (half[[0, 2]] - plain[[0, 2]]).abs().max().item() <= TOLERANCE
    for row in (1, 3):
        assert (half[row] - plain[row]).abs().max().item() > 1e-3
        assert (half[row] - method_output[row]).abs().max().item() > 1e-3


def test_bad_batches_are_clear_errors_and_leave_the_unet_untouched(unet: SD1UNet, baseline: dict[str, Any]) -> None:
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(share_group_norm=True)).inject()
    try:
        inputs = baseline["inputs"]
        for batch_size in (1, 3):
            odd = {key: value if key == "timestep" else value[:batch_size] for key, value in inputs.items()}
            with pytest.raises(ChainError, match="classifier_free_guidance=True the batch must be"):
                models.run_unet(unet, odd)
    finally:
        adapter.eject()
    assert [name for name, _ in unet.named_modules()] == baseline["modules"]
    assert torch.equal(models.run_unet(unet, baseline["inputs"]), baseline["output"])


SET_OPTIONS: dict[str, Any] = {"share_group_norm": True, "shared_score_shift": math.log(2), "shared_score_scale": 0.8}


def pick(inputs: dict[str, torch.Tensor], images: list[int], per_half: int) -> dict[str, torch.Tensor]:
    """The rows of some images in both CFG halves of every batched input."""
    rows = [half * per_half + image for half in range(2) for image in images]
    return {key: value if key == "timestep" else value[rows] for key, value in inputs.items()}


@pytest.fixture(scope="module")
def set_of_eight(unet: SD1UNet) -> dict[str, Any]:
    """A reference and 7 targets with CFG (16 rows), and their shared output in one batch (16x16 latents: 4 tokens at
    the middle level, for AdaIN's unbiased variance)."""
    inputs = models.unet_inputs(unet, batch_size=16, size=16, seed=3)
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(**SET_OPTIONS)).inject()
    try:
        output = models.run_unet(unet, inputs)
    finally:
        adapter.eject()
    return {"inputs": inputs, "output": output}


def test_targets_in_chunks_with_recorded_references_equal_one_batch(
    unet: SD1UNet, set_of_eight: dict[str, Any]
) -> None:
    chunk = 3  # chunks of 3, 3 and 1 (the chunk arithmetic is tested on small chains in tests/layers)
    inputs, expected = set_of_eight["inputs"], set_of_eight["output"]
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(**SET_OPTIONS)).inject()
    try:
        with adapter.reference_cache.record():
            reference = models.run_unet(unet, pick(inputs, [0], 8))
        chunks: list[tuple[list[int], torch.Tensor]] = []
        with adapter.reference_cache.replay():
            for start in range(1, 8, chunk):
                images = list(range(start, min(start + chunk, 8)))
                chunks.append((images, models.run_unet(unet, pick(inputs, images, 8))))
    finally:
        adapter.eject()
    assert (reference - expected[[0, 8]]).abs().max().item() <= 1e-4
    for images, output in chunks:
        assert (output - pick({"x": expected}, images, 8)["x"]).abs().max().item() <= 1e-4
