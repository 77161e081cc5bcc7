"""Model CPU offload: each stage has only its models on the accelerator, and the models still compute the same."""

import pytest
import torch
from torch import nn

from style_aligned.flux.autoencoder import AutoencoderConfig, FluxAutoencoder
from style_aligned.flux.models import TEXT_ENCODERS, FluxModels
from style_aligned.flux.offload import ModelOffload
from tests.helpers import flux


def test_each_stage_holds_only_its_models_on_the_accelerator() -> None:
    places: dict[str, str] = {}
    moves: list[tuple[str, str]] = []
    models = {name: nn.Linear(2, 2) for name in ("clip_text_encoder", "t5", "transformer", "autoencoder")}
    names = {id(module): name for name, module in models.items()}

    def move(module: nn.Module, device: torch.device) -> None:  # records where each model goes, moves nothing
        places[names[id(module)]] = device.type
        moves.append((names[id(module)], device.type))

    offload = ModelOffload(models, device="cuda", move=move)
    assert set(places.values()) == {"cpu"}
    seen = []
    for stage in (TEXT_ENCODERS, ("transformer",), ("transformer",), ("autoencoder",)):
        moves.clear()
        with offload.use(*stage):
            seen.append(({name for name, place in places.items() if place == "cuda"}, list(moves)))
    assert [on for on, _ in seen] == [set(TEXT_ENCODERS), {"transformer"}, {"transformer"}, {"autoencoder"}]
    assert seen[2][1] == []  # the transformer stays for the next step: nothing moves
    assert seen[1][1][:2] == [("clip_text_encoder", "cpu"), ("t5", "cpu")]  # off before the next one comes
    assert offload.stages == [TEXT_ENCODERS, ("transformer",), ("transformer",), ("autoencoder",)]
    offload.offload_all()
    assert set(places.values()) == {"cpu"}
    with pytest.raises(KeyError, match="no model named vae"):
        with offload.use("vae"):
            pass


@torch.no_grad()
def test_models_compute_the_same_through_an_offload() -> None:
    transformer = flux.tiny_refiners()
    autoencoder = FluxAutoencoder(AutoencoderConfig(block_out_channels=(32, 32), latent_channels=16))
    models = FluxModels(transformer=transformer, autoencoder=autoencoder)
    inputs = flux.transformer_inputs(flux.TINY)
    expected = flux.run_refiners(transformer, inputs)
    offload = models.offload("cpu")
    assert set(offload.models) == {"transformer", "autoencoder"}
    with offload.use("transformer"):
        assert torch.equal(flux.run_refiners(transformer, inputs), expected)
    with offload.use("autoencoder"):
        assert models.autoencoder.decode(torch.zeros(1, 16, 2, 2)).shape == (1, 3, 4, 4)
