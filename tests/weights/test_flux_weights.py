"""FLUX.1 weights: Black Forest Labs' single-file layout reads as diffusers' own converter gives it, and diffusers
folders load with their configuration."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (  # type: ignore[import-untyped]
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file, save_file

from style_aligned.flux import FLUX_DEV, FluxConfig
from style_aligned.weights.flux import (
    BFL_PREFIX,
    bfl_transformer_shapes,
    flux_transformer_key_map,
    infer_flux_config,
    load_flux_transformer,
)
from style_aligned.weights.safetensors_io import WeightsError
from tests.helpers import flux
from tests.helpers.models import full_size_fixture


@full_size_fixture()
def bfl_flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-width FLUX.1 [dev] with one block of each kind, random, written in the original layout (float16)."""
    generator = torch.Generator().manual_seed(0)
    original = {
        BFL_PREFIX + key: torch.randn(shape, generator=generator).half()
        for key, shape in bfl_transformer_shapes(FluxConfig(num_layers=1, num_single_layers=1)).items()
    }
    path = tmp_path_factory.mktemp("bfl") / "flux1-dev.safetensors"
    save_file(original, str(path))
    return path


@torch.no_grad()
def test_black_forest_labs_file_loads_as_diffusers_converts_it(bfl_flux_file: Path) -> None:
    config, path = FluxConfig(num_layers=1, num_single_layers=1), bfl_flux_file
    original = load_file(str(path))
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
