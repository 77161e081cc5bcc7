"""StyleAligned on FLUX.1 equals an independent implementation of AlignedGen's shared attention (SPEC section 9), on
the tiny random transformer (fast) and on the reduced full-width one (slow); chunks with recorded references equal the
one-batch call; options without meaning on a model are refused; eject is exact, with LoRAs in any order."""

from typing import Any

import pytest
import torch

from style_aligned.adapters.flux_sharing import window_of_steps
from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.flux import FluxTransformer
from style_aligned.options import StyleAlignedOptions
from style_aligned.weights.flux_lora import FluxLoraManager
from tests.helpers import flux
from tests.helpers.aligned_gen import AlignedGenSettings, aligned_gen

TIMESTEP = 700.0
TINY_CASES: list[tuple[dict[str, Any], AlignedGenSettings]] = [
    ({}, AlignedGenSettings(shared=(2, 3))),
    (
        {"shared_score_schedule": "decrease", "shifted_reference_positions": False},
        AlignedGenSettings(shared=(2, 3), decrease=True, shifted=False),
    ),
    (
        {"shared_blocks": ("double", "single"), "shared_score_shift": 0.3, "adain_values": True},
        AlignedGenSettings(shared=(0, 1, 2, 3), shift=0.3, adain_values=True),
    ),
    ({"shared_layers": (1, 3), "shared_score_scale": 0.8}, AlignedGenSettings(shared=(1, 3), style_lambda=0.8)),
    ({"shared_blocks": ("double",), "shared_window": (0.2, 0.5)}, AlignedGenSettings(shared=(0, 1))),
    ({"attention_mode": "swap"}, AlignedGenSettings(shared=(2, 3), style_lambda=1.0, swap=True)),
]


def inputs_at(config: Any, batch_size: int, timestep: float = TIMESTEP, size: int = 8) -> dict[str, torch.Tensor]:
    inputs = flux.transformer_inputs(config, batch_size=batch_size, size=size, text_tokens=8 if size == 8 else 16)
    inputs["timestep"] = torch.full((batch_size,), timestep / 1000)
    return inputs


def rows(inputs: dict[str, torch.Tensor], selected: slice) -> dict[str, torch.Tensor]:
    return {k: v if k in ("img_ids", "txt_ids") else v[selected] for k, v in inputs.items()}


def adapted(model: FluxTransformer, options: dict[str, Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    adapter = StyleAlignedAdapter(model, StyleAlignedOptions(**options), classifier_free_guidance=False).inject()
    try:
        return flux.run_refiners(model, inputs)
    finally:
        adapter.eject()


def reference(model: FluxTransformer, settings: AlignedGenSettings, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    timestep = float(inputs["timestep"][0]) * 1000
    with aligned_gen(model, settings, text_ids=inputs["txt_ids"], image_ids=inputs["img_ids"], timestep=timestep):
        return flux.run_refiners(model, inputs)


@pytest.fixture(scope="module")
def tiny() -> FluxTransformer:
    return flux.tiny_refiners()


@pytest.mark.parametrize(("options", "settings"), TINY_CASES)
def test_tiny_transformer_equals_aligned_gen(
    tiny: FluxTransformer, options: dict[str, Any], settings: AlignedGenSettings
) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)
    ours = adapted(tiny, options, inputs)
    expected = reference(tiny, settings, inputs)
    plain = flux.run_refiners(tiny, inputs)
    assert flux.relative_error(ours, expected)[1] < 1e-4
    assert flux.relative_error(ours[0], plain[0])[1] < 1e-5  # the reference is generated as it would be alone
    assert (ours[1:] - plain[1:]).abs().max() > 1e-3  # the targets are not


@pytest.mark.parametrize("window", [(0.0, 0.2), (0.25,), (0.31, 1.0)])
def test_outside_the_step_window_attention_is_plain(tiny: FluxTransformer, window: tuple[float, ...]) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)  # progress 0.3
    ours = adapted(tiny, {"shared_window": window}, inputs)
    assert flux.relative_error(ours, flux.run_refiners(tiny, inputs))[1] < 1e-6


def test_window_of_steps_shares_those_steps(tiny: FluxTransformer) -> None:
    timesteps = [1000.0, 900.0, 700.0, 400.0]
    window = window_of_steps(timesteps, 1, 3)  # steps 1 and 2
    for timestep, shared in zip(timesteps, (False, True, True, False), strict=True):
        inputs = inputs_at(flux.TINY, batch_size=2, timestep=timestep)
        ours = adapted(tiny, {"shared_window": window}, inputs)
        assert ((ours - flux.run_refiners(tiny, inputs)).abs().max() > 1e-4) == shared
    with pytest.raises(ValueError, match="not a range"):
        window_of_steps(timesteps, 2, 2)


def test_eject_is_exact_and_score_changes_reach_the_layers(tiny: FluxTransformer) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)
    plain = flux.run_refiners(tiny, inputs)
    keys = list(tiny.state_dict())
    adapter = StyleAlignedAdapter(tiny, StyleAlignedOptions(), classifier_free_guidance=False).inject()
    assert [layer.index for layer in adapter.shared_layers] == [2, 3]
    adapter.shared_score_scale, adapter.shared_score_shift = 0.8, 0.3
    changed = flux.run_refiners(tiny, inputs)
    adapter.eject()
    assert torch.equal(flux.run_refiners(tiny, inputs), plain) and list(tiny.state_dict()) == keys
    expected = reference(tiny, AlignedGenSettings(shared=(2, 3), style_lambda=0.8, shift=0.3), inputs)
    assert flux.relative_error(changed, expected)[1] < 1e-4


@pytest.mark.parametrize("options", [{}, {"shared_blocks": ("double", "single"), "adain_values": True}])
def test_strength_one_is_the_adapter_and_strength_zero_the_plain_transformer(
    tiny: FluxTransformer, options: dict[str, Any]
) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)
    method, plain = adapted(tiny, options, inputs), flux.run_refiners(tiny, inputs)
    assert torch.equal(adapted(tiny, {**options, "strength": 1.0}, inputs), method)
    assert torch.equal(adapted(tiny, {**options, "strength": 0.0}, inputs), plain)
    half = adapted(tiny, {**options, "strength": 0.5}, inputs)
    assert flux.relative_error(half[0], plain[0])[1] < 1e-5  # the reference is never changed
    assert (half[1:] - plain[1:]).abs().max() > 1e-4 and (half[1:] - method[1:]).abs().max() > 1e-4


@pytest.mark.parametrize("weights", [(1.0,), (2.0, 1.0)])
def test_chunks_with_recorded_references_equal_one_batch(tiny: FluxTransformer, weights: tuple[float, ...]) -> None:
    count = len(weights)
    inputs = inputs_at(flux.TINY, batch_size=count + 3)
    options = StyleAlignedOptions(shared_blocks=("double", "single"), adain_values=True, shared_score_shift=0.2)
    adapter = StyleAlignedAdapter(tiny, options, classifier_free_guidance=False, reference_weights=weights).inject()
    try:
        whole = flux.run_refiners(tiny, inputs)
        cache = adapter.reference_cache
        with cache.record():
            first = flux.run_refiners(tiny, rows(inputs, slice(0, count + 1)))
        with cache.replay():
            second = flux.run_refiners(tiny, rows(inputs, slice(count + 1, count + 2)))
            third = flux.run_refiners(tiny, rows(inputs, slice(count + 2, count + 3)))
        cache.clear()
    finally:
        adapter.eject()
    chunked = torch.cat([first, second, third])
    assert flux.relative_error(chunked, whole)[1] < 1e-5
    plain = flux.run_refiners(tiny, inputs)
    assert flux.relative_error(whole[:count], plain[:count])[1] < 1e-5  # each reference as it would be alone


def test_several_references_weigh_as_one_when_they_are_the_same(tiny: FluxTransformer) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)
    doubled = {k: v if k in ("img_ids", "txt_ids") else torch.cat([v[:1], v]) for k, v in inputs.items()}
    one = adapted(tiny, {}, inputs)
    adapter = StyleAlignedAdapter(tiny, classifier_free_guidance=False, reference_weights=(3.0, 1.0)).inject()
    try:
        two = flux.run_refiners(tiny, doubled)
    finally:
        adapter.eject()
    assert flux.relative_error(two[1:], one)[1] < 1e-5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"share_group_norm": True}, "share_group_norm has no meaning on FLUX.1"),
        ({"only_self_level": 0.5, "control_reference": True}, "only_self_level, control_reference have no meaning"),
        ({"full_attention_share": True}, "full_attention_share has no meaning on FLUX.1"),
        ({"shared_blocks": ("single", "up")}, "shared_blocks up has no meaning on FLUX.1"),
        ({"shared_layers": (4,)}, r"shared_layers \[4\] out of range: this transformer has 4 attention layers"),
    ],
)
def test_options_without_meaning_on_flux_are_refused(
    tiny: FluxTransformer, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        StyleAlignedAdapter(tiny, StyleAlignedOptions(**options), classifier_free_guidance=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shared_score_schedule": "decrease", "shared_score_scale": 1.1}, "not used with shared_score_schedule"),
        ({"shared_window": (0.5, 0.2)}, "shared_window takes one or two increasing fractions"),
        ({"shared_window": (1.5,)}, "shared_window takes"),
        ({"shared_score_schedule": "slow"}, "shared_score_schedule must be fixed or decrease"),
        ({"attention_mode": "swap", "shared_score_schedule": "decrease"}, "only apply with attention_mode='concat'"),
    ],
)
def test_bad_flux_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StyleAlignedOptions(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shared_window": (0.5,)}, "shared_window has no meaning on a U-Net"),
        ({"shared_score_schedule": "decrease"}, "shared_score_schedule has no meaning on a U-Net"),
        ({"shifted_reference_positions": False}, "shifted_reference_positions has no meaning"),
        ({"shared_blocks": ("single",)}, "shared_blocks single has no meaning on a U-Net"),
    ],
)
def test_flux_options_are_refused_on_a_unet(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StyleAlignedOptions(**options).resolved("sdxl")


def test_defaults_per_model() -> None:
    assert StyleAlignedOptions().resolved("flux_dev").shared_score_scale == 1.1
    assert StyleAlignedOptions().resolved("sd1").shared_score_scale == 1.0
    assert StyleAlignedOptions(shared_score_schedule="decrease").resolved("flux_dev").shared_score_scale is None


def test_one_timestep_per_set(tiny: FluxTransformer) -> None:
    inputs = inputs_at(flux.TINY, batch_size=2)
    inputs["timestep"] = torch.tensor([0.7, 0.6])
    adapter = StyleAlignedAdapter(tiny, classifier_free_guidance=False).inject()
    try:
        with pytest.raises(Exception, match="one timestep"):
            flux.run_refiners(tiny, inputs)
    finally:
        adapter.eject()


def tiny_lora(seed: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_k", "proj_out"):
        out_features = flux.TINY.in_channels if module == "proj_out" else flux.TINY.inner_dim
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, flux.TINY.inner_dim, generator=generator)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
    return tensors


@pytest.mark.parametrize("order", ["lora first", "adapter first"])
@pytest.mark.parametrize("removal", ["lora first", "adapter first"])
def test_a_set_with_a_lora_then_both_removed_exactly(tiny: FluxTransformer, order: str, removal: str) -> None:
    inputs = inputs_at(flux.TINY, batch_size=3)
    plain = flux.run_refiners(tiny, inputs)
    state = {key: value.clone() for key, value in tiny.state_dict().items()}
    manager = FluxLoraManager(tiny)
    adapter = StyleAlignedAdapter(tiny, classifier_free_guidance=False)
    if order == "lora first":
        manager.add_loras("style", tensors=tiny_lora())
        adapter.inject()
    else:
        adapter.inject()
        manager.add_loras("style", tensors=tiny_lora())
    both = flux.run_refiners(tiny, inputs)
    if removal == "lora first":
        manager.remove_loras("style")
        adapter.eject()
    else:
        adapter.eject()
        manager.remove_loras("style")
    after = tiny.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[key], value) for key, value in state.items())
    assert torch.equal(flux.run_refiners(tiny, inputs), plain)
    manager.add_loras("style", tensors=tiny_lora())
    try:
        expected = reference(tiny, AlignedGenSettings(shared=(2, 3)), inputs)
        with_lora = flux.run_refiners(tiny, inputs)
    finally:
        manager.remove_loras("style")
    assert flux.relative_error(both, expected)[1] < 1e-4
    assert (with_lora - both).abs().max() > 1e-3  # the set is not the LoRA's plain output


REDUCED_CASES: list[tuple[dict[str, Any], AlignedGenSettings, float]] = [
    ({}, AlignedGenSettings(shared=(2, 3, 4, 5)), TIMESTEP),
    (
        {"shared_score_schedule": "decrease", "shifted_reference_positions": False, "shared_window": (0.0, 0.5)},
        AlignedGenSettings(shared=(2, 3, 4, 5), decrease=True, shifted=False),
        800.0,
    ),
    (
        {"shared_blocks": ("double",), "shared_score_scale": 1.3, "shared_score_shift": 0.2},
        AlignedGenSettings(shared=(0, 1), style_lambda=1.3, shift=0.2),
        TIMESTEP,
    ),
    ({"shared_layers": (1, 4), "adain_values": True}, AlignedGenSettings(shared=(1, 4), adain_values=True), TIMESTEP),
    ({"shared_window": (0.5, 1.0)}, AlignedGenSettings(shared=()), TIMESTEP),  # outside the window: plain
]


@pytest.mark.parametrize(("options", "settings", "timestep"), REDUCED_CASES)
def test_reduced_transformer_equals_aligned_gen(
    flux_reduced: dict[str, Any], options: dict[str, Any], settings: AlignedGenSettings, timestep: float
) -> None:
    model: FluxTransformer = flux_reduced["model"]
    inputs = inputs_at(flux.REDUCED, batch_size=3, timestep=timestep, size=16)
    ours = adapted(model, options, inputs)
    expected = reference(model, settings, inputs)
    assert flux.relative_error(ours, expected)[1] < 1e-4


def test_reduced_transformer_in_chunks_equals_one_batch(flux_reduced: dict[str, Any]) -> None:
    model: FluxTransformer = flux_reduced["model"]
    inputs = inputs_at(flux.REDUCED, batch_size=3, size=16)
    adapter = StyleAlignedAdapter(model, classifier_free_guidance=False).inject()
    try:
        whole = flux.run_refiners(model, inputs)
        with adapter.reference_cache.record():
            first = flux.run_refiners(model, rows(inputs, slice(0, 2)))
        with adapter.reference_cache.replay():
            second = flux.run_refiners(model, rows(inputs, slice(2, 3)))
        adapter.reference_cache.clear()
    finally:
        adapter.eject()
    assert flux.relative_error(torch.cat([first, second]), whole)[1] < 1e-5
