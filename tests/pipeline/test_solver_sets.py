"""Sets with every solver, with and without classifier-free guidance, on the random-weight SD1 pipeline at 64x64 px."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1

from style_aligned import SharedAttentionAdapter
from style_aligned.cli import main as cli
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.solvers import image_seed
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.unet_backbone import UNetBackbone

PROMPTS = ["a toy train", "a toy airplane", "a toy bicycle", "a toy car", "a toy boat", "an owl", "a castle", "a cup"]


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def plain_image(sd: StableDiffusion_1, spec: SetSpec) -> Image.Image:
    """The plain pipeline's image of the set's first prompt alone: Refiners' own loop, the same solver and noise."""
    spec = spec.resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    backbone = UNetBackbone(sd)
    solver, previous = backbone.make_solver(spec), (sd.solver, sd.classifier_free_guidance)
    cfg = spec.classifier_free_guidance
    conditioning = SetConditioning(sd, spec.image_prompts()[:1], "", width=spec.width, height=spec.height)([0], cfg)
    x = backbone.initial_latents(spec, 1, solver)
    sd.solver, sd.classifier_free_guidance = solver, cfg
    torch.manual_seed(image_seed(spec.seed, 0))  # the plain loop's stochastic solver draws from the global generator
    try:
        with torch.no_grad():
            for step in sd.steps:
                x = sd(x, step, **conditioning, condition_scale=spec.guidance)
            return sd.lda.latents_to_image(x)
    finally:
        sd.solver, sd.classifier_free_guidance = previous


CASES = [
    ("ddim", None, 7.5),
    ("dpm", None, 7.5),
    ("euler", "trailing", 1.0),
    ("lcm", None, 1.0),
    ("dpm", "trailing", 1.0),
]


@pytest.mark.parametrize(("solver", "spacing", "guidance"), CASES)
def test_each_solver_reference_is_the_plain_image_and_chunks_change_nothing(
    sd: StableDiffusion_1, solver: str, spacing: str | None, guidance: float
) -> None:
    spec = SetSpec(
        prompts=PROMPTS[:3],
        width=64,
        steps=3,
        seed=4,
        guidance=guidance,
        solver=solver,  # type: ignore[arg-type]
        timestep_spacing=spacing,  # type: ignore[arg-type]
        style=StyleAlignedOptions(share_group_norm=True),
    )
    events: list[ProgressEvent] = []
    whole = generate_set(sd, spec, progress=events.append)
    assert [(e.phase, e.chunk, e.chunks) for e in events[:2]] == [("targets", 1, 1), ("targets", 1, 1)]
    assert whole.spec.classifier_free_guidance is (guidance > 1)
    if solver == "dpm":  # a solver with a history: each chunk keeps its own (the others are checked in chunks below)
        chunked = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": 2}))
        assert np.abs(pixels(chunked.images) - pixels(whole.images)).max() <= 1
    plain = plain_image(sd, spec)
    assert np.abs(pixels([plain]) - pixels(whole.images[:1])).max() <= 1
    assert np.abs(pixels(whole.images[1:]) - pixels(whole.images[:1])).max() > 0  # the targets are other images
    assert not list(sd.unet.layers(SharedAttentionAdapter))


def test_set_of_eight_without_guidance_in_chunks_of_two_and_seven(sd: StableDiffusion_1) -> None:
    spec = SetSpec(
        prompts=PROMPTS, width=64, steps=2, guidance=1.0, seed=2, style=StyleAlignedOptions(share_group_norm=True)
    )
    events: list[ProgressEvent] = []
    by_two = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": 2}), progress=events.append)
    assert [e.chunks for e in events if e.phase == "targets"] == [4] * 8  # 4 calls per step, the reference in the first
    by_seven = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": 7}))
    assert np.abs(pixels(by_two.images) - pixels(by_seven.images)).max() <= 1
    plain = plain_image(sd, spec)
    assert np.abs(pixels([plain]) - pixels(by_two.images[:1])).max() <= 1


def generate_command(model: Path, out: Path, *extra: str) -> list[str]:
    arguments = ["generate", "--model", str(model), "--out", str(out), "--size", "64x64"]
    return arguments + [argument for prompt in PROMPTS[:3] for argument in ("--prompt", prompt)] + list(extra)


def test_generate_command_with_euler_trailing_four_steps_without_guidance(sd1_converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    options = ["--solver", "euler", "--timestep-spacing", "trailing", "--steps", "4", "--guidance", "1"]
    cli(generate_command(sd1_converted, out, *options, "--seed", "3", "--chunk-size", "1"))
    sidecar: dict[str, Any] = json.loads((out / "set.json").read_text())
    assert sidecar["solver"] == "euler" and sidecar["timestep_spacing"] == "trailing" and sidecar["steps"] == 4
    assert sidecar["guidance"] == 1.0 and sidecar["classifier_free_guidance"] is False
    # the sidecar's settings, given back to the command, reproduce the set bit for bit
    again = tmp_path / "again"
    arguments = ["generate", "--model", str(sd1_converted), "--out", str(again)]
    arguments += [argument for prompt in sidecar["prompts"] for argument in ("--prompt", prompt)]
    arguments += ["--size", f"{sidecar['width']}x{sidecar['height']}", "--seed", str(sidecar["seed"])]
    arguments += ["--steps", str(sidecar["steps"]), "--guidance", str(sidecar["guidance"])]
    arguments += ["--solver", sidecar["solver"], "--timestep-spacing", sidecar["timestep_spacing"]]
    arguments += ["--chunk-size", str(sidecar["chunk_size"])]
    cli(arguments)
    for name in sidecar["images"]:
        with Image.open(out / name) as first, Image.open(again / name) as second:
            assert np.array_equal(np.asarray(first), np.asarray(second))


def test_transfer_with_another_solver_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["transfer", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--prompt", "a cat"]
    arguments += ["--image", str(tmp_path / "absent.png"), "--caption", "a dog", "--solver", "dpm"]
    with pytest.raises(SystemExit) as exit_info:
        cli(arguments)
    assert exit_info.value.code == 2
    assert "transfer denoises with the solver its inversion is made for" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
