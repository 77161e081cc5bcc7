"""The FLUX.1 transformer equals diffusers' `FluxTransformer2DModel` with the same weights, converted by the key map."""

import time
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch

from style_aligned.flux import FLUX_SCHNELL, FluxTransformer
from style_aligned.flux.layers import RotaryEmbedding
from style_aligned.weights.flux import load_flux_transformer
from tests.helpers import flux


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_tiny_transformer_equals_diffusers(guidance_embeds: bool) -> None:
    config = flux.TINY if guidance_embeds else flux.replace_config(flux.TINY, guidance_embeds=False)
    source = flux.diffusers_transformer(config)
    inputs = flux.transformer_inputs(config, batch_size=3, size=8, text_tokens=5)
    model = load_flux_transformer(source.state_dict(), config=config)
    _, relative = flux.relative_error(flux.run_refiners(model, inputs), flux.run_diffusers(source, inputs))
    assert relative < 1e-5


def test_reduced_full_width_transformer_equals_diffusers(flux_reduced: dict[str, Any]) -> None:
    start = time.perf_counter()
    actual = flux.run_refiners(flux_reduced["model"], flux_reduced["inputs"])
    seconds = time.perf_counter() - start
    absolute, relative = flux.relative_error(actual, flux_reduced["expected"])
    print(f"reduced FLUX.1 [dev]: max abs diff {absolute:.2e}, relative {relative:.2e}, call {seconds:.1f} s")
    assert relative < 1e-4


def test_attention_ends_in_a_replaceable_scaled_dot_product_attention() -> None:
    with torch.device("meta"):
        model = FluxTransformer(flux.TINY)
    found = 0
    for chain in (m for m in model.modules() if isinstance(m, fl.Chain)):
        children = list(chain)
        for position, child in enumerate(children):
            if isinstance(child, fl.ScaledDotProductAttention):
                found += 1
                assert any(isinstance(m, RotaryEmbedding) for m in children[position - 1].modules())
                assert child.num_heads == flux.TINY.num_attention_heads
    assert found == flux.TINY.num_layers + flux.TINY.num_single_layers


def test_projections_are_refiners_linear_layers() -> None:
    with torch.device("meta"):
        model = FluxTransformer(flux.TINY)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(isinstance(m, fl.Linear) for m in linear)


def test_schnell_refuses_a_guidance_value() -> None:
    with torch.device("meta"):
        model = FluxTransformer(FLUX_SCHNELL)
    with pytest.raises(ValueError, match="no guidance embedding"):
        model.set_guidance(guidance=torch.tensor([3.5]))


def test_missing_inputs_are_named() -> None:
    model = flux.tiny_refiners()
    inputs = flux.transformer_inputs(flux.TINY)
    model.set_timestep(timestep=inputs["timestep"])
    model.set_guidance(guidance=inputs["guidance"])
    model.set_text_embedding(text_embedding=inputs["encoder_hidden_states"])
    model.set_pooled_text_embedding(pooled_text_embedding=inputs["pooled_projections"])
    with pytest.raises(Exception, match="token ids are not set"):  # Refiners wraps it in a ChainError
        model(inputs["hidden_states"])
