"""FLUX.1 LoRAs in the diffusers/peft and kohya layouts equal diffusers' own LoRA loading; removing them restores the
transformer exactly."""

from typing import Any

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (  # type: ignore[import-untyped]
    _convert_kohya_flux_lora_to_diffusers,  # pyright: ignore[reportPrivateUsage]
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # type: ignore[import-untyped]
from refiners.fluxion.adapters.lora import LoraAdapter

from style_aligned.flux import FluxConfig
from style_aligned.weights.flux import load_flux_transformer
from style_aligned.weights.flux_lora import FluxLoraManager, flux_lora_layers
from style_aligned.weights.lora import LoraError
from tests.helpers import flux

pytest.importorskip("peft")

RANK = 4
PEFT_LAYERS = [  # diffusers modules
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.1.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.1.ff_context.net.2",
    "transformer_blocks.0.norm1.linear",
    "transformer_blocks.1.norm1_context.linear",
    "single_transformer_blocks.1.attn.to_v",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "single_transformer_blocks.0.norm.linear",
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
]
KOHYA_LAYERS = [  # Black Forest Labs modules, with kohya's alpha or None
    ("double_blocks.0.img_attn.qkv", 2.0),
    ("double_blocks.1.txt_attn.qkv", None),
    ("double_blocks.0.img_attn.proj", 8.0),
    ("double_blocks.1.txt_attn.proj", 1.0),
    ("double_blocks.1.txt_mlp.0", 4.0),
    ("double_blocks.0.img_mlp.2", None),
    ("double_blocks.0.img_mod.lin", 2.0),
    ("double_blocks.1.txt_mod.lin", None),
    ("single_blocks.0.linear2", 2.0),
    ("single_blocks.1.modulation.lin", None),
    ("img_in", 2.0),
    ("txt_in", None),
    ("time_in.in_layer", 1.0),
    ("vector_in.out_layer", None),
    ("guidance_in.in_layer", 4.0),
    ("final_layer.linear", None),  # diffusers ignores kohya's alpha on the final layer: none here
    ("final_layer.adaLN_modulation.1", None),
]


def _pair(out_features: int, in_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(RANK, in_features, generator=generator) * 0.1
    return down, torch.randn(out_features, RANK, generator=generator) * 0.1


def peft_lora(source: Any, seed: int = 1) -> dict[str, torch.Tensor]:
    generator, modules, tensors = torch.Generator().manual_seed(seed), dict(source.named_modules()), {}
    for name in PEFT_LAYERS:
        down, up = _pair(*modules[name].weight.shape, generator)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
    return tensors


def kohya_lora(config: FluxConfig, layers: list[tuple[str, float | None]], seed: int = 2) -> dict[str, torch.Tensor]:
    from style_aligned.weights.flux import bfl_transformer_shapes

    generator, shapes, tensors = torch.Generator().manual_seed(seed), bfl_transformer_shapes(config), {}
    for name, alpha in layers:
        key = "lora_unet_" + name.replace(".", "_")
        down, up = _pair(*shapes[f"{name}.weight"], generator)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@torch.no_grad()
def test_lora_equals_diffusers_and_removal_is_exact(layout: str) -> None:
    source = flux.diffusers_transformer(flux.TINY)
    tensors = peft_lora(source) if layout == "peft" else kohya_lora(flux.TINY, KOHYA_LAYERS)
    inputs = flux.transformer_inputs(flux.TINY, batch_size=2, size=8, text_tokens=5)
    model = load_flux_transformer({k: v.clone() for k, v in source.state_dict().items()}, config=flux.TINY)
    before = flux.run_refiners(model, inputs)
    state, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    # diffusers' kohya converter names the layers outside the blocks (img_in, time_in, final_layer, ...) without the
    # `transformer.` prefix, so that its loader skips them: given the prefix, they load as converted
    state = {key if key.startswith("transformer.") else f"transformer.{key}": value for key, value in state.items()}
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=source)
    expected = flux.run_diffusers(source, inputs)
    manager = FluxLoraManager(model)
    manager.add_loras("style", tensors=tensors)
    adapters = len(list(model.layers(LoraAdapter)))
    assert adapters == (len(PEFT_LAYERS) if layout == "peft" else len(KOHYA_LAYERS) + 4)  # two qkv cut in three
    absolute, relative = flux.relative_error(flux.run_refiners(model, inputs), expected)
    print(f"{layout} LoRA vs diffusers: max abs diff {absolute:.2e}, relative {relative:.2e}")
    assert relative < 1e-4
    assert (expected - before).abs().max() > 100 * absolute  # the LoRA changes the output
    manager.set_scale("style", 0.0)
    assert flux.relative_error(flux.run_refiners(model, inputs), before)[1] < 1e-6
    manager.remove_loras("style")
    assert manager.names == [] and not list(model.layers(LoraAdapter))
    assert torch.equal(flux.run_refiners(model, inputs), before)


@torch.no_grad()
def test_two_loras_share_layers_and_leave_one_by_one() -> None:
    model = flux.tiny_refiners()
    inputs = flux.transformer_inputs(flux.TINY)
    before = flux.run_refiners(model, inputs)
    manager = FluxLoraManager(model)
    manager.add_loras("a", tensors=kohya_lora(flux.TINY, KOHYA_LAYERS[:3], seed=5))
    alone = flux.run_refiners(model, inputs)
    manager.add_loras("b", tensors=kohya_lora(flux.TINY, KOHYA_LAYERS[:3], seed=6), scale=0.5)
    assert manager.names == ["a", "b"]
    manager.remove_loras("b")
    assert torch.equal(flux.run_refiners(model, inputs), alone)
    manager.remove_loras("a")
    assert torch.equal(flux.run_refiners(model, inputs), before)


def test_fused_projections_are_cut_as_diffusers_cuts_them_at_full_width() -> None:
    """Kohya's `linear1` and `qkv` LoRAs at FLUX.1's width (diffusers' converter assumes it), dense and block-sparse:
    each part's update `up @ down` equals the one diffusers' converter gives."""
    config = FluxConfig(num_layers=1, num_single_layers=1)
    tensors = kohya_lora(config, [("single_blocks.0.linear1", 2.0), ("double_blocks.0.img_attn.qkv", 8.0)])
    sparse = torch.zeros(3 * config.inner_dim, 3)  # rank 3, one rank per part: diffusers chunks down instead
    for part in range(3):
        sparse[part * config.inner_dim : (part + 1) * config.inner_dim, part] = torch.randn(config.inner_dim)
    tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"] = torch.randn(3, config.inner_dim)
    tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"] = sparse
    expected = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    layers, unplaced = flux_lora_layers(tensors, config)
    assert unplaced == []
    assert sorted(f"transformer.{name}.lora_A.weight" for name in layers) == sorted(
        key for key in expected if key.endswith("lora_A.weight")
    )
    for name, weights in layers.items():
        assert weights.up is not None and weights.down is not None
        theirs = expected[f"transformer.{name}.lora_B.weight"] @ expected[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(weights.up @ weights.down, theirs, rtol=1e-5, atol=1e-6)


def test_keys_that_fit_no_layer_are_refused_before_anything_is_attached() -> None:
    model = flux.tiny_refiners()
    manager = FluxLoraManager(model)
    tensors = kohya_lora(flux.TINY, KOHYA_LAYERS[:2])
    bad = tensors | {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 32)}
    bad |= {"lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(96, RANK), "weird.key": torch.ones(1)}
    with pytest.raises(LoraError, match=r"3 keys that match no layer.*double_blocks_7.*weird.key"):
        manager.add_loras("bad", tensors=bad)
    assert not list(model.layers(LoraAdapter))
    wrong = {k: torch.zeros(RANK, 7) if k.endswith("lora_down.weight") else v for k, v in tensors.items()}
    with pytest.raises(LoraError, match="do not fit its layer"):
        manager.add_loras("wrong", tensors=wrong)
    manager.add_loras("good", tensors=tensors)
    with pytest.raises(LoraError, match="already loaded"):
        manager.add_loras("good", tensors=tensors)
    with pytest.raises(LoraError, match="no LoRA named"):
        manager.set_scale("other", 1.0)
