"""FLUX.1 weights: Black Forest Labs' single-file layout reads as diffusers' own converter gives it, and diffusers
folders load with their configuration."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (  # type: ignore[import-untyped]
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import save_file

from style_aligned.flux import FLUX_DEV, FluxConfig
from style_aligned.weights.flux import (
    BFL_PREFIX,
    flux_transformer_key_map,
    infer_flux_config,
    load_flux_transformer,
)
from style_aligned.weights.safetensors_io import WeightsError
from tests.helpers import flux


def bfl_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a FLUX.1 transformer in the Black Forest Labs layout."""
    dim, mlp = config.inner_dim, config.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    for name, inp in (("time_in", 256), ("vector_in", config.pooled_projection_dim), ("guidance_in", 256)):
        linear(f"{name}.in_layer", dim, inp)
        linear(f"{name}.out_layer", dim, dim)
    linear("txt_in", dim, config.joint_attention_dim)
    linear("img_in", dim, config.in_channels)
    for i in range(config.num_layers):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", 6 * dim, dim)
            linear(f"{block}_attn.qkv", 3 * dim, dim)
            linear(f"{block}_attn.proj", dim, dim)
            linear(f"{block}_mlp.0", mlp, dim)
            linear(f"{block}_mlp.2", dim, mlp)
            for norm in ("query_norm", "key_norm"):
                shapes[f"{block}_attn.norm.{norm}.scale"] = (config.attention_head_dim,)
    for i in range(config.num_single_layers):
        block = f"single_blocks.{i}"
        linear(f"{block}.modulation.lin", 3 * dim, dim)
        linear(f"{block}.linear1", 3 * dim + mlp, dim)
        linear(f"{block}.linear2", dim, dim + mlp)
        for norm in ("query_norm", "key_norm"):
            shapes[f"{block}.norm.{norm}.scale"] = (config.attention_head_dim,)
    linear("final_layer.adaLN_modulation.1", 2 * dim, dim)
    linear("final_layer.linear", config.in_channels, dim)
    return shapes


@pytest.mark.slow
@torch.no_grad()
def test_black_forest_labs_file_loads_as_diffusers_converts_it(tmp_path: Path) -> None:
    """A full-width FLUX.1 [dev] with one block of each kind, random, written in the original layout (float16)."""
    config = FluxConfig(num_layers=1, num_single_layers=1)
    generator = torch.Generator().manual_seed(0)
    original = {
        BFL_PREFIX + key: torch.randn(shape, generator=generator).half() for key, shape in bfl_shapes(config).items()
    }
    path = tmp_path / "flux1-dev.safetensors"
    save_file(original, str(path))
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    del original
    model = load_flux_transformer(path, dtype=torch.float16)
    assert model.config == config
    state = model.state_dict()
    key_map = flux_transformer_key_map(config)
    assert sorted(key_map) == sorted(expected)
    for source, target in key_map.items():
        assert torch.equal(state[target], expected[source]), source


def test_key_map_of_reduced_depths_and_schnell() -> None:
    full = flux_transformer_key_map(FLUX_DEV)
    assert len(full) == 1160
    schnell = flux_transformer_key_map(FluxConfig(num_layers=2, num_single_layers=1, guidance_embeds=False))
    assert not any("guidance" in key for key in schnell)
    assert "single_transformer_blocks.1.proj_out.weight" not in schnell
    assert schnell["single_transformer_blocks.0.proj_out.weight"].startswith("SingleStreamBlocks.SingleStreamBlock.")
    with pytest.raises(ValueError, match="fewer"):
        flux_transformer_key_map(FluxConfig(num_layers=20))


def test_diffusers_folder_loads_with_its_config(tmp_path: Path) -> None:
    config = flux.replace_config(flux.TINY, guidance_embeds=False)
    source = flux.diffusers_transformer(config)
    source.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    model = load_flux_transformer(tmp_path / "transformer")
    assert model.config == config
    inputs = flux.transformer_inputs(config)
    assert flux.relative_error(flux.run_refiners(model, inputs), flux.run_diffusers(source, inputs))[1] < 1e-5


def test_config_is_told_by_the_shapes() -> None:
    from diffusers import FluxTransformer2DModel  # type: ignore[import-untyped]

    with torch.device("meta"):
        source = FluxTransformer2DModel(**flux.REDUCED.to_diffusers())
    assert infer_flux_config({k: tuple(v.shape) for k, v in source.state_dict().items()}) == flux.REDUCED


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    source = flux.diffusers_transformer(flux.TINY)
    state = dict(source.state_dict())
    del state["proj_out.bias"]
    with pytest.raises(WeightsError, match=r"missing keys \(1\): proj_out.bias"):
        load_flux_transformer(state, config=flux.TINY)
    path = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.unknown.weight": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="not a key of a FLUX.1 double-stream block"):
        load_flux_transformer(path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"patch_size": 2}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="patch_size"):
        load_flux_transformer(tmp_path / "folder")
