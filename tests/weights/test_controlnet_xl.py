"""The SDXL ControlNet adapter equals diffusers' SDXL ControlNetModel on converted random weights (full size)."""

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from refiners.foundationals.latent_diffusion import SDXLUNet

from style_aligned.weights.controlnet_xl import SDXLControlnetAdapter
from style_aligned.weights.convert import convert
from style_aligned.weights.loading import load_model
from tests.helpers import diffusers_models as dm
from tests.helpers import models
from tests.helpers.compare import assert_close


def residuals(adapter: SDXLControlnetAdapter, unet: SDXLUNet, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    adapter.set_controlnet_condition(inputs["condition"])
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["embedding"])
    unet.set_pooled_text_embedding(inputs["text_embeds"])
    unet.set_time_ids(inputs["time_ids"])
    with torch.no_grad():
        adapter.controlnet(inputs["x"])
    return list(unet.use_context("unet")["residuals"])


@models.full_size_fixture()
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A random diffusers SDXL ControlNet converted to Refiners weights, with its inputs and diffusers' residuals."""
    generator = torch.Generator().manual_seed(4)
    inputs = {
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([700]),
        "embedding": torch.randn(2, 77, 2048, generator=generator),
        "text_embeds": torch.randn(2, 1280, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        "condition": torch.rand(2, 3, 64, 64, generator=generator),
    }
    folder = tmp_path_factory.mktemp("controlnet-sdxl")
    source = folder / "diffusers"
    with torch.no_grad():
        controlnet = dm.controlnet("sdxl")
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        down, mid = controlnet(
            inputs["x"],
            inputs["timestep"],
            inputs["embedding"],
            inputs["condition"],
            added_cond_kwargs=added,
            return_dict=False,
        )
        expected = [*down, mid]
        dm.save(controlnet, source)
        del controlnet
    (file,) = convert(source, folder / "converted")
    shutil.rmtree(source)
    yield {"inputs": inputs, "expected": expected, "file": file}
    shutil.rmtree(folder)


def test_sdxl_controlnet_matches_diffusers(source: dict[str, Any]) -> None:
    inputs, expected = source["inputs"], source["expected"]
    loaded = load_model(source["file"], kind="sdxl_controlnet")
    with torch.device("meta"):
        unet = SDXLUNet(in_channels=4)
    adapter = SDXLControlnetAdapter(unet, name="depth")
    adapter.controlnet.load_state_dict(loaded.state_dict(), assign=True)
    adapter.inject()
    actual = residuals(adapter, unet, inputs)
    assert len(actual) == len(expected) == 10
    for residual, reference in zip(actual, expected, strict=True):
        assert_close(residual, reference)
