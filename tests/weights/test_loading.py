"""Loading builds models empty and fills them with exactly the tensors of their files, and nothing else."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import SD1Autoencoder

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES
from style_aligned.weights.convert import open_sources
from style_aligned.weights.empty import build_empty, empty_init
from style_aligned.weights.loading import load_model, load_pipeline
from style_aligned.weights.random_weights import build_random
from style_aligned.weights.safetensors_io import SafetensorsReader, write_safetensors


def assert_holds_exactly(model: fl.Chain, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every parameter and buffer of the model is one of `tensors` (cast to `dtype`), bit for bit; none is left."""
    state = model.state_dict()
    assert sorted(state) == sorted(tensors)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, f"{name} was left on the meta device"
        assert name in tensors, f"{name} is not in the file"
    for key, expected in tensors.items():
        loaded = state[key]
        assert loaded.dtype == (dtype if expected.is_floating_point() else expected.dtype), key
        assert torch.equal(loaded, expected.to(loaded.dtype)), f"{key} differs from the file"


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {key: reader.read(key) for key in reader.keys()}


def test_empty_init_runs_no_initialiser_and_allocates_nothing() -> None:
    model = build_empty(CLIPTextEncoderL)
    assert all(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])

    with empty_init():  # tensors placed elsewhere explicitly are initialised as usual
        torch.manual_seed(0)
        linear = torch.nn.Linear(8, 8, device="cpu")
    torch.manual_seed(0)
    assert torch.equal(linear.weight, torch.nn.Linear(8, 8).weight)


def test_building_a_text_encoder_empty_does_not_import_dynamo() -> None:
    """On the meta device, `normal_` runs torch's reference implementation, whose first call imports `torch._dynamo`
    (over a second); an empty build runs no initialiser, so a fresh process never imports it."""
    code = (
        "import sys; from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL;"
        " from style_aligned.weights.empty import build_empty; build_empty(CLIPTextEncoderL);"
        " assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loaded_model_holds_exactly_the_files_weights(tmp_path: Path, dtype: torch.dtype) -> None:
    source = build_random(SD1Autoencoder, seed=5)
    path = tmp_path / "autoencoder.safetensors"
    state = source.state_dict()
    entries = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()]
    write_safetensors(path, entries, state.__getitem__, metadata={"model": "sd1_autoencoder"})
    del source, state

    model = load_model(path, dtype=dtype)
    assert isinstance(model, SD1Autoencoder)
    assert_holds_exactly(model, file_tensors(path), dtype)


def test_loaded_pipeline_holds_exactly_the_converted_files(sd1_converted: Path) -> None:
    sd = load_pipeline(sd1_converted)
    models = {"sd1_unet": sd.unet, "sd1_text_encoder": sd.clip_text_encoder, "sd1_autoencoder": sd.lda}
    for name in PIPELINES["sd1"]:
        assert_holds_exactly(models[name], file_tensors(sd1_converted / ARCHITECTURES[name].filename), torch.float32)


def test_pipeline_loaded_from_diffusers_holds_exactly_the_renamed_tensors(sd1_source: dict[str, Any]) -> None:
    sd = load_pipeline(sd1_source["pipeline"])
    models = {"sd1_unet": sd.unet, "sd1_text_encoder": sd.clip_text_encoder, "sd1_autoencoder": sd.lda}
    with open_sources(sd1_source["pipeline"]) as sources:
        for source in sources:
            tensors = {key: source.read(key) for key, _, _ in source.entries()}
            assert_holds_exactly(models[source.architecture.name], tensors, torch.float32)
