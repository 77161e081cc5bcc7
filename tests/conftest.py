"""Shared fixtures and the two tiers of the suite.

Models are built once per session and deleted at its end (see `models.py`). A fixture that builds or loads a
full-size model is declared with `models.full_size_fixture`; every test that uses one, directly or through other
fixtures, is marked `slow` here, and that is the only way a test becomes `slow`. Every other test (the fast tier,
`-m "not slow"`) is checked not to build a large model: its peak memory may grow by `FAST_TIER_PEAK_LIMIT` at most.
"""

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import models
from tests.helpers import peak_memory as memory
from tests.helpers.models import full_size_fixture, uses_full_size_fixture
from tests.helpers.peak_memory import PeakMemory

MMAP_THRESHOLD = 1 << 20

FAST_TIER_PEAK_LIMIT = 3 << 29
"""How much a test of the fast tier may add to the process's peak resident memory, fixtures included: 1.5 GiB (the
largest fast test adds about 0.8 GiB; a full-size SD1 U-Net is 3.4 GiB, an SDXL one 10 GiB)."""

_module_fixtures: dict[Any, set[str]] = {}
_peak = PeakMemory()


def pytest_configure(config: pytest.Config) -> None:
    """Give freed model memory back to the system at once (glibc).

    glibc raises its mmap threshold (up to 32 MiB) each time it frees a large block, after which tensors of a few MiB,
    most of a model's weights, come from its heap: freed, they stay resident, and new tensors of other sizes do not
    fit their holes, so each large model built after another added gigabytes that outlived it. A fixed threshold of
    1 MiB keeps every large tensor in its own mapping, returned when freed; subprocesses get the same setting.
    """
    if memory.set_mmap_threshold(MMAP_THRESHOLD):
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test whose fixtures include a full-size fixture, and refuse any other `slow` marker."""
    marked_by_hand = [item.nodeid for item in items if item.get_closest_marker("slow")]
    if marked_by_hand:
        raise pytest.UsageError(
            "tests are marked slow by hand (they are marked from their fixtures: build full-size models in a "
            f"fixture declared with `full_size_fixture`): {', '.join(marked_by_hand[:5])}"
        )
    for item in items:
        _module_fixtures.setdefault(getattr(item, "module", None), set()).update(getattr(item, "fixturenames", ()))
        if uses_full_size_fixture(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_held_model_rank)  # stable: the order is kept otherwise


HELD_MODELS_FIRST = ("flux_reduced", "sd1_random", "sdxl_unet")
"""The held models whose modules run first, grouped by model in this order, so that each is built once and dropped
before the next (the SD1 pipeline's modules follow, in their own order)."""


def _held_model_rank(item: pytest.Item) -> int:
    names = _module_fixtures.get(getattr(item, "module", None), set())
    return next((rank for rank, name in enumerate(HELD_MODELS_FIRST) if name in names), len(HELD_MODELS_FIRST))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not item.get_closest_marker("slow"):
        _peak.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield  # the fixtures that end with this test are torn down
    module = getattr(nextitem, "module", None)
    if module is not getattr(item, "module", None):  # a module ends: drop the held models the next one does not use
        models.release(keep=_module_fixtures.get(module, set()) if nextitem else ())
    if not item.get_closest_marker("slow") and _peak.available:
        growth = _peak.growth()
        if growth > FAST_TIER_PEAK_LIMIT:
            pytest.fail(
                f"{item.nodeid} is not slow but its peak memory grew by {growth / 2**30:.1f} GiB: build full-size "
                "models in a fixture declared with `full_size_fixture` (tests/helpers/models.py)",
                pytrace=False,
            )
    return None


@pytest.fixture(scope="module", autouse=True)
def collect_garbage() -> Iterator[None]:
    """Free each module's models when it ends: Refiners models hold reference cycles (children know their parent),
    so they are freed by the garbage collector, not as soon as they are dropped."""
    yield
    gc.collect()
    memory.trim()


@full_size_fixture(scope="session")
def sd1_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A random SD1 pipeline and ControlNet in the diffusers layout, with the diffusers models' outputs."""
    from tests.helpers import diffusers_models as dm

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


@full_size_fixture(scope="session")
def sd1_converted(sd1_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The random SD1 pipeline converted once, by the command line."""
    from style_aligned.cli import main as cli

    destination = tmp_path_factory.mktemp("sd1-converted") / "sd1"
    cli(["convert", "--from", str(sd1_source["pipeline"]), "--to", str(destination)])
    yield destination
    shutil.rmtree(destination)


@full_size_fixture()
def sd1_pipeline(sd1_converted: Path) -> Any:
    """The converted random SD1 pipeline, loaded once and shared by the modules that use it in a row (a Refiners
    `StableDiffusion_1`)."""
    from refiners.foundationals.latent_diffusion import StableDiffusion_1

    from style_aligned.weights.loading import load_pipeline

    model = models.held("sd1_pipeline", lambda: load_pipeline(sd1_converted))  # drops any other held model
    assert isinstance(model, StableDiffusion_1)
    return model


@full_size_fixture(scope="session")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A random FLUX.1 [dev] pipeline in the diffusers layout: tiny transformer and T5, CLIP L and the autoencoder at
    their real sizes. The front ends' end-to-end tests (batches on Ray, the app in a browser) make their sets with it:
    what they add to the set engine is the same for every backbone, and it loads in a second."""
    from tests.helpers.flux_pipeline import write_flux_pipeline

    folder = tmp_path_factory.mktemp("flux") / "FLUX.1-tiny"
    write_flux_pipeline(folder)
    yield folder
    shutil.rmtree(folder)


@full_size_fixture()
def sd1_random() -> Any:
    """A random full-size SD1 pipeline built in memory (a Refiners `StableDiffusion_1`), shared by the modules that use
    it in a row."""
    return models.sd1()


@full_size_fixture()
def sdxl_unet() -> Any:
    """A random full-size SDXL U-Net (10 GiB), shared by the modules that use it in a row."""
    return models.sdxl_unet()


@full_size_fixture()
def flux_reduced() -> dict[str, Any]:
    """FLUX.1 [dev] at full width with 2 double and 4 single blocks: the diffusers model's output on random inputs, and
    the Refiners model loaded from its state dict (sharing its tensors: one copy of 5.2 GB).

    Built once per run: the modules that use it run first, one after another (see `pytest_collection_modifyitems`),
    and it is dropped when the first module that does not use it begins."""
    return models.held("flux_reduced", _reduced_flux)


def _reduced_flux() -> dict[str, Any]:
    from style_aligned.weights.flux import load_flux_transformer
    from tests.helpers import flux

    source = flux.diffusers_transformer(flux.REDUCED)
    inputs = flux.transformer_inputs(flux.REDUCED, batch_size=2, size=16, text_tokens=16)
    expected = flux.run_diffusers(source, inputs)
    model = load_flux_transformer(source.state_dict(), config=flux.REDUCED)
    del source
    gc.collect()
    return {"model": model, "inputs": inputs, "expected": expected}
