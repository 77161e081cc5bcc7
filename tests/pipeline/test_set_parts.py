"""A set made part by part (the reference with one chunk of targets at a time) equals the whole set, and the
reference can be previewed while it denoises; on FLUX.1 models a few MB large at 64x64 px (the parts are the set
engine's, the same for every backbone)."""

import numpy as np
import pytest
from PIL import Image
from torch import Tensor

from style_aligned.flux.latents import unpack_latents
from style_aligned.flux.models import FluxModels
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_set
from tests.helpers.flux_sets import tiny_flux_models

PROMPTS = ["a toy train", "a toy airplane", "a toy bicycle", "a toy car"]


@pytest.fixture(scope="module")
def sd() -> FluxModels:
    return tiny_flux_models()


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_parts_of_a_set_equal_the_whole_set(sd: FluxModels) -> None:
    spec = SetSpec(prompts=PROMPTS, width=64, height=64, steps=2, chunk_size=2)
    whole = pixels(generate_set(sd, spec).images)
    previews: list[Tensor] = []
    events: list[ProgressEvent] = []
    first = generate_set(sd, spec, progress=events.append, images=[0, 1, 2], preview=previews.append)
    second = generate_set(sd, spec, images=[0, 3])
    assert first.prompts == PROMPTS[:3] and second.prompts == [PROMPTS[0], PROMPTS[3]]
    assert np.array_equal(pixels(first.images), whole[:3]) and np.array_equal(pixels(second.images), whole[[0, 3]])
    assert [tuple(latent.shape) for latent in previews] == [(1, 16, 8, 8)] * 2
    assert [event.done for event in events] == [1, 2, 3, 4, 5] and events[-1].total == 5  # 2 calls, 3 decodes
    without_reference = generate_set(sd, spec, images=[1, 2])  # the reference is denoised, not decoded
    assert np.array_equal(pixels(without_reference.images), whole[1:3])
    for wrong in ([0, 1], [3, 1, 2], [0, 2, 1], [0, 4], []):
        with pytest.raises(ValueError, match="a part of a set of 4 images"):
            generate_set(sd, spec, images=wrong)


def test_parts_of_a_transfer_set_equal_the_whole_set(sd: FluxModels) -> None:
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    spec = TransferSpec(prompts=PROMPTS[1:3], width=64, height=64, steps=2, offset=1, chunk_size=1)
    trajectory = make_trajectory(sd, Image.fromarray(gradient), PROMPTS[0], spec=spec, progress=lambda event: None)
    whole = pixels(transfer_set(sd, trajectory, spec).images)
    previews: list[Tensor] = []
    parts = [transfer_set(sd, trajectory, spec, images=[0, 1], preview=previews.append)]
    parts.append(transfer_set(sd, trajectory, spec, images=[0, 2]))
    assert parts[1].prompts == [PROMPTS[0], PROMPTS[2]]
    assert np.array_equal(pixels(parts[0].images), whole[:2]) and np.array_equal(pixels(parts[1].images), whole[[0, 2]])
    assert len(previews) == 2 and np.array_equal(
        previews[-1].numpy(), unpack_latents(trajectory.latents[-1:], 8, 8).numpy()
    )
