"""Packing, token ids and rotary embeddings equal diffusers' FLUX.1 code."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb  # type: ignore[import-untyped]
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # type: ignore[import-untyped]
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # type: ignore[import-untyped]

from style_aligned.flux import FluxConfig, image_ids, pack_latents, text_ids, unpack_latents
from style_aligned.flux.layers import HeadRMSNorm, apply_rotary, rotary_frequencies


def test_packing_equals_diffusers_and_unpacks() -> None:
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    with pytest.raises(ValueError, match="both sides must be even"):
        pack_latents(torch.randn(1, 16, 5, 4))
    with pytest.raises(ValueError, match="do not unpack"):
        unpack_latents(packed, 8, 10)


def test_ids_equal_diffusers() -> None:
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    assert torch.equal(text_ids(7), torch.zeros(7, 3))


def test_rotary_embedding_equals_diffusers() -> None:
    ids = torch.cat((text_ids(3), image_ids(8, 6)))
    cosines, sines = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    frequencies = rotary_frequencies(ids, (16, 56, 56), 10000)
    assert torch.equal(frequencies[0], cosines) and torch.equal(frequencies[1], sines)
    x = torch.randn(2, ids.shape[0], 3 * 128)
    expected = apply_rotary_emb(x.unflatten(-1, (3, 128)), (cosines, sines), sequence_dim=1).flatten(-2)
    assert torch.equal(apply_rotary(x, frequencies), expected)


def test_head_rms_norm_normalises_each_head() -> None:
    norm = HeadRMSNorm(4)
    x = torch.randn(2, 3, 12)
    expected = torch.nn.functional.rms_norm(x.unflatten(-1, (3, 4)), (4,), eps=1e-6).flatten(-2)
    assert torch.allclose(norm(x), expected)


def test_config_checks_and_round_trips() -> None:
    config = FluxConfig(num_layers=1, num_single_layers=2, guidance_embeds=False)
    assert FluxConfig.from_diffusers({**config.to_diffusers(), "_class_name": "FluxTransformer2DModel"}) == config
    assert config.inner_dim == 3072 and config.mlp_dim == 12288
    with pytest.raises(ValueError, match="add up to attention_head_dim"):
        FluxConfig(attention_head_dim=64)
    with pytest.raises(ValueError, match="patch_size"):
        FluxConfig.from_diffusers({"patch_size": 2})
