"""Style transfer on FLUX.1: the flow's Euler steps run backwards from the encoded image, and the reference following
that trajectory, on FLUX.1 models a few MB large."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from style_aligned.flux.models import FluxModels
from style_aligned.flux.solver import FlowMatchEuler, calculate_shift
from style_aligned.pipeline.backbone import backbone_of
from style_aligned.pipeline.inversion import FlowInversion, ReferenceTrajectory, encode_image, inversion_of
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_latents, transfer_set
from tests.helpers.flux_sets import tiny_flux_models


@pytest.fixture(scope="module")
def dev() -> FluxModels:
    return tiny_flux_models()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    pixels = torch.Generator().manual_seed(3)
    return Image.fromarray(torch.randint(0, 256, (48, 32, 3), generator=pixels, dtype=torch.uint8).numpy())


def spec(**changes: Any) -> TransferSpec:
    return TransferSpec(
        **({"prompts": ["a toy car", "a fox"], "seed": 2, "steps": 4, "width": 32, "height": 48} | changes)
    )


@pytest.mark.parametrize(
    "solver", [FlowMatchEuler(28, mu=calculate_shift(4096)), FlowMatchEuler(4)], ids=["dev", "schnell"]
)
def test_inverting_then_sampling_a_constant_velocity_gives_back_the_latent(solver: FlowMatchEuler) -> None:
    velocity = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(0))
    encoded = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(1))
    inversion = inversion_of(solver)
    assert isinstance(inversion, FlowInversion)
    x = encoded
    for index in range(inversion.num_steps):
        x = inversion.step(x, velocity, index)
    assert torch.allclose(x, encoded + velocity, atol=1e-5)  # the flow from sigma 0 to sigma 1
    for step in solver.inference_steps:
        x = solver(x, velocity, step)
    torch.testing.assert_close(x, encoded, rtol=0, atol=2e-6)  # float32 rounding only


def test_the_transfer_reference_follows_its_trajectory_to_the_encoded_image(
    dev: FluxModels, picture: Image.Image
) -> None:
    trajectory = make_trajectory(dev, picture, "a red square", spec=spec())
    backbone = backbone_of(dev)
    encoded = encode_image(dev, picture, width=32, height=48)
    assert trajectory.latents.shape == (5, 6, 64) and trajectory.guidance == 1.0
    assert torch.equal(trajectory.latents[-1], encoded[0])
    latents, resolved = transfer_latents(dev, trajectory, spec())
    assert resolved.offset == 3 and resolved.solver == "flow_euler" and resolved.guidance == 3.5
    assert torch.equal(latents[0], encoded[0])  # the reference ends at the encoded image
    assert not torch.equal(latents[1], latents[2])
    whole = transfer_set(dev, trajectory, spec())
    assert [image.size for image in whole.images] == [(32, 48)] * 3
    with torch.no_grad():
        expected = backbone.decode(encoded, resolved)
    assert whole.images[0].tobytes() == expected.tobytes()  # image 0 is the reconstructed input
    part = transfer_set(dev, trajectory, replace(spec(), chunk_size=1), images=[2])
    assert part.images[0].tobytes() == whole.images[2].tobytes()


def test_a_saved_trajectory_is_reused_and_checked(dev: FluxModels, picture: Image.Image, tmp_path: Path) -> None:
    trajectory = make_trajectory(dev, picture, "a red square", spec=spec(steps=2, offset=0))
    trajectory.save(tmp_path / "inversion.safetensors")
    loaded = ReferenceTrajectory.load(tmp_path / "inversion.safetensors")
    assert torch.equal(loaded.latents, trajectory.latents) and loaded.timesteps == trajectory.timesteps
    assert loaded.guidance == 1.0
    with pytest.raises(ValueError, match="made for 2 steps, this set has 3"):
        transfer_set(dev, loaded, spec(steps=3, offset=0))
    with pytest.raises(ValueError, match="made at 32x48 px, this set is 48x48 px"):
        transfer_set(dev, loaded, spec(steps=2, offset=0, width=48, height=48))


def test_schnell_inverts_without_guidance_and_refuses_one() -> None:
    schnell = tiny_flux_models(schnell=True)
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    trajectory = make_trajectory(schnell, picture, "red", spec=spec(steps=4, width=32, height=32))
    assert trajectory.guidance is None
    latents, resolved = transfer_latents(schnell, trajectory, spec(steps=4, width=32, height=32))
    assert resolved.offset == 1 and resolved.guidance is None
    assert torch.equal(latents[0], trajectory.latents[-1])
    with pytest.raises(ValueError, match="takes no inversion guidance"):
        spec(inversion_guidance=2.0).resolved("flux_schnell")
