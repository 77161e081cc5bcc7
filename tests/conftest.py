"""Shared fixtures: models are built once per session and deleted at its end (see `models.py`)."""

import gc
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import diffusers_models as dm
from tests.helpers import models

FULL_SIZE_FIXTURES = frozenset({"sd1_source", "sd1_converted", "sd1_pipeline", "flux_reduced"})
"""The session fixtures that build full-size random models: every test that uses one is `slow`."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a full-size model through the shared fixtures (modules that build their own
    full-size models mark themselves)."""
    for item in items:
        if FULL_SIZE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def collect_garbage() -> Iterator[None]:
    """Free each module's models when it ends: Refiners models hold reference cycles (children know their parent),
    so they are freed by the garbage collector, not as soon as they are dropped."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def sd1_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A random SD1 pipeline and ControlNet in the diffusers layout, with the diffusers models' outputs."""
    models.release()
    root = tmp_path_factory.mktemp("sd1-diffusers")
    pipeline, controlnet_folder = root / "pipeline", root / "controlnet"
    dm.write_model_index(pipeline, "sd1")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([400]),
        "embedding": torch.randn(2, 77, 768, generator=generator),
        "tokens": torch.randint(0, 49408, (2, 77), generator=generator),
        "image": torch.randn(1, 3, 64, 64, generator=generator),
        "latents": torch.randn(1, 4, 8, 8, generator=generator),
        "condition": torch.rand(2, 3, 128, 128, generator=generator),
    }
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        unet = dm.unet("sd1")
        outputs["unet"] = unet(inputs["x"], inputs["timestep"], inputs["embedding"]).sample
        dm.save(unet, pipeline / "unet")
        del unet
        text_encoder = dm.text_encoder("text_encoder", "sd1")
        outputs["text_encoder"] = text_encoder(inputs["tokens"]).last_hidden_state
        dm.save(text_encoder, pipeline / "text_encoder")
        del text_encoder
        vae = dm.vae()
        outputs["encoded"] = vae.encode(inputs["image"]).latent_dist.mean
        outputs["decoded"] = vae.decode(inputs["latents"]).sample
        dm.save(vae, pipeline / "vae")
        del vae
        controlnet = dm.controlnet()
        down, mid = controlnet(
            inputs["x"], inputs["timestep"], inputs["embedding"], inputs["condition"], return_dict=False
        )
        outputs["controlnet"] = [*down, mid]
        dm.save(controlnet, controlnet_folder)
        del controlnet
    yield {"root": root, "pipeline": pipeline, "controlnet": controlnet_folder, "inputs": inputs, "outputs": outputs}
    shutil.rmtree(root)


@pytest.fixture(scope="session")
def sd1_converted(sd1_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The random SD1 pipeline converted once, by the command line."""
    from style_aligned.cli import main as cli

    destination = tmp_path_factory.mktemp("sd1-converted") / "sd1"
    cli(["convert", "--from", str(sd1_source["pipeline"]), "--to", str(destination)])
    yield destination
    shutil.rmtree(destination)


@pytest.fixture(scope="module")
def sd1_pipeline(sd1_converted: Path) -> Any:
    """The converted random SD1 pipeline, loaded once per test module (a Refiners `StableDiffusion_1`)."""
    from refiners.foundationals.latent_diffusion import StableDiffusion_1

    from style_aligned.weights.loading import load_pipeline

    model = models.held("sd1-converted", lambda: load_pipeline(sd1_converted))  # drops any other held model
    assert isinstance(model, StableDiffusion_1)
    return model


@pytest.fixture(scope="session")
def flux_reduced() -> Iterator[dict[str, Any]]:
    """FLUX.1 [dev] at full width with 2 double and 4 single blocks: the diffusers model's output on random inputs, and
    the Refiners model loaded from its state dict (sharing its tensors: one copy of 5.2 GB)."""
    from tests.helpers import flux

    models.release()
    source = flux.diffusers_transformer(flux.REDUCED)
    inputs = flux.transformer_inputs(flux.REDUCED, batch_size=2, size=16, text_tokens=16)
    expected = flux.run_diffusers(source, inputs)
    from style_aligned.weights.flux import load_flux_transformer

    model = load_flux_transformer(source.state_dict(), config=flux.REDUCED)
    del source
    gc.collect()
    yield {"model": model, "inputs": inputs, "expected": expected}
    del model
    gc.collect()
