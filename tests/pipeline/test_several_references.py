"""Sets with several weighted references, and swap mode, on the random-weight SD1 pipeline at 64x64 px."""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1

from style_aligned import StyleAlignedAdapter
from style_aligned.cli import main as cli
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.generate import decode, generate_set, initial_noise
from style_aligned.pipeline.solvers import ddim
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_set
from tests.helpers import models

REFERENCES = ["a watercolor painting of a lake", "a pencil sketch of a tree"]
TARGETS = ["a toy train", "a toy airplane", "a toy car"]


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


def plain_images(sd: StableDiffusion_1, prompts: list[str], noise: torch.Tensor) -> list[Image.Image]:
    """The model's own images of prompts, without any adapter, denoised together with the sets' DDIM solver."""
    conditioning = SetConditioning(sd, prompts, "", width=64, height=64)(list(range(len(prompts))))
    solver, sd.solver = sd.solver, ddim(sd, 2)
    try:
        x = noise
        with torch.no_grad():
            for step in sd.steps:
                x = sd(x, step, **conditioning, condition_scale=7.5)
        return decode(sd, x, SetSpec(prompts=prompts).resolved(sd))
    finally:
        sd.solver = solver


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_one_reference_in_the_list_is_todays_set(sd: StableDiffusion_1) -> None:
    single = generate_set(sd, SetSpec(prompts=TARGETS[:2], reference_prompt=REFERENCES[0], width=64, steps=2))
    listed = generate_set(
        sd, SetSpec(prompts=TARGETS[:2], reference_prompts=REFERENCES[:1], reference_weights=[3.0], width=64, steps=2)
    )
    assert np.abs(pixels(single.images) - pixels(listed.images)).max() == 0


def test_each_reference_is_its_plain_image_and_chunks_agree(sd: StableDiffusion_1) -> None:
    spec = SetSpec(prompts=TARGETS, reference_prompts=REFERENCES, reference_weights=[2.0, 1.0], width=64, steps=2)
    blended = generate_set(sd, spec)
    assert blended.prompts == REFERENCES + TARGETS and len(blended.images) == 5
    # each reference is identical to the plain model's image of its prompt (no adapter; the same noise and batch)
    plain = plain_images(
        sd, REFERENCES, noise=initial_noise(spec.resolved(sd), 5, device=sd.device, dtype=sd.dtype)[:2]
    )
    assert np.abs(pixels(blended.images[:2]) - pixels(plain)).max() == 0
    unshared = generate_set(
        sd, SetSpec(prompts=REFERENCES + TARGETS, width=64, steps=2, style=StyleAlignedOptions(only_self_level=1.0))
    )
    difference = np.abs(pixels(blended.images) - pixels(unshared.images)).reshape(5, -1).max(axis=1)
    assert difference[2:].min() > 0  # the targets take the references' styles
    for chunk_size in (1, 2):
        chunked = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": chunk_size}))
        assert np.abs(pixels(chunked.images) - pixels(blended.images)).max() <= 1
    # the weights matter: the other weighting moves the targets, not the references
    other = generate_set(sd, SetSpec(**{**spec.__dict__, "reference_weights": [1.0, 4.0]}))
    moved = np.abs(pixels(other.images) - pixels(blended.images)).reshape(5, -1).max(axis=1)
    assert moved[0] == moved[1] == 0 and moved[2:].min() > 0


def test_two_references_in_swap_mode(sd: StableDiffusion_1) -> None:
    style = StyleAlignedOptions(attention_mode="swap")
    spec = SetSpec(prompts=TARGETS[:2], reference_prompts=REFERENCES, width=64, steps=2, style=style)
    swapped = generate_set(sd, spec)
    chunked = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": 1}))
    assert np.abs(pixels(swapped.images) - pixels(chunked.images)).max() <= 1
    assert swapped.spec.style.share_group_norm is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reference_weights": [1.0]}, "one reference weight per reference"),
        ({"reference_weights": [1.0, -1.0]}, "finite numbers > 0"),
        ({"reference_prompt": "x"}, "not both"),
        ({"reference_prompts": []}, "at least one prompt"),
    ],
)
def test_bad_references_are_clear_errors(sd: StableDiffusion_1, changes: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = dict(prompts=TARGETS, reference_prompts=REFERENCES, width=64, steps=2)
    with pytest.raises(ValueError, match=message):
        generate_set(sd, SetSpec(**(settings | changes)))


def test_generate_command_with_two_references(sd1_converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    arguments = ["generate", "--model", str(sd1_converted), "--out", str(out), "--size", "64x64", "--steps", "2"]
    for reference in REFERENCES:
        arguments += ["--reference-prompt", reference]
    arguments += ["--reference-weight", "3", "--reference-weight", "1", "--prompt", TARGETS[0], "--prompt", TARGETS[1]]
    cli(arguments)
    sidecar = json.loads((out / "set.json").read_text())
    assert sidecar["reference_prompts"] == REFERENCES and sidecar["reference_weights"] == [3.0, 1.0]
    assert sidecar["references"] == [
        {"prompt": REFERENCES[0], "weight": 0.75},
        {"prompt": REFERENCES[1], "weight": 0.25},
    ]
    assert [name[:13] for name in sidecar["images"]] == [
        "00-reference-",
        "01-reference-",
        "02-a-toy-trai",
        "03-a-toy-airp",
    ]
    assert all((out / name).is_file() for name in sidecar["images"])


def test_generate_command_checks_the_weights_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), "--prompt", "p"]
    with pytest.raises(SystemExit) as exit_info:
        cli([*arguments, "--reference-prompt", "a", "--reference-prompt", "b", "--reference-weight", "1"])
    assert exit_info.value.code == 2 and "one --reference-weight per --reference-prompt" in capsys.readouterr().err


def test_transfer_from_two_images(sd: StableDiffusion_1, sd1_converted: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    spec = TransferSpec(prompts=TARGETS[:2], width=64, steps=2, offset=1, reference_weights=[1.0, 2.0])
    trajectories = [
        make_trajectory(sd, image, caption, spec=spec) for image, caption in zip(images, REFERENCES, strict=True)
    ]
    result = transfer_set(sd, trajectories, spec)
    assert result.prompts == REFERENCES + TARGETS[:2] and result.spec.reference_prompts == REFERENCES
    single = transfer_set(sd, trajectories[0], replace(spec, reference_weights=None))
    assert single.spec.reference_prompt == REFERENCES[0] and len(single.images) == 3
    # each reference ends at its own encoded image: the same as when it is the only reference
    assert np.abs(pixels(result.images[:1]) - pixels(single.images[:1])).max() == 0
    # the command: --image/--caption pairs, each with a weight
    paths = [tmp_path / f"ref{i}.png" for i in range(2)]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    out = tmp_path / "transfer"
    arguments = ["transfer", "--model", str(sd1_converted), "--out", str(out), "--size", "64x64", "--steps", "2"]
    arguments += ["--offset", "1"]
    for path, caption in zip(paths, REFERENCES, strict=True):
        arguments += ["--image", str(path), "--caption", caption, "--reference-weight", "1"]
    cli([*arguments, "--prompt", TARGETS[0]])
    sidecar = json.loads((out / "set.json").read_text())
    assert [reference["prompt"] for reference in sidecar["references"]] == REFERENCES
    assert sidecar["reference_images"] == [str(path) for path in paths]
    assert len(sidecar["images"]) == 3 and all((out / name).is_file() for name in sidecar["images"])


def test_swap_inject_and_eject_leave_the_unet_bit_identical(sd: StableDiffusion_1) -> None:
    unet = sd.unet
    inputs = models.unet_inputs(unet, batch_size=4)  # [uncond ref, uncond target | cond ref, cond target]
    before, state = models.run_unet(unet, inputs), models.fingerprint(unet)
    structure = repr(unet)
    adapter = StyleAlignedAdapter(unet, StyleAlignedOptions(attention_mode="swap")).inject()
    swapped = models.run_unet(unet, inputs)
    adapter.eject()
    after = models.run_unet(unet, inputs)
    assert torch.equal(before, after) and models.fingerprint(unet) == state and repr(unet) == structure
    assert (swapped[[0, 2]] - before[[0, 2]]).abs().max().item() <= 1e-5  # the references are plain
    assert (swapped[[1, 3]] - before[[1, 3]]).abs().max().item() > 1e-4  # the targets see the references
