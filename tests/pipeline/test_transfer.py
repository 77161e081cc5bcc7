"""Style transfer from a real image: DDIM inversion, the reference trajectory, the transfer loop and command."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1

from style_aligned.cli import main as cli
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.images import fit_image
from style_aligned.pipeline.inversion import DDIMInversion, ReferenceTrajectory, encode_image, invert
from style_aligned.pipeline.solvers import ddim
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_latents, transfer_set

CAPTION = "Man laying in a bed, medieval painting."
TARGETS = ["A man working on a laptop, medieval painting.", "A man eats pizza, medieval painting."]


def alphas_cumprod() -> torch.Tensor:
    """The reference examples' schedule: scaled-linear betas from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("steps", [50, 3])
def test_inversion_step_matches_the_formula(steps: int) -> None:
    solver = ddim(CpuModel(), steps)  # type: ignore[arg-type]
    inversion = DDIMInversion(solver)
    alphas = alphas_cumprod()
    spacing = 1000 // steps
    assert [inversion.timestep(i) for i in range(steps)] == [int(t) for t in solver.timesteps.flip(0)]
    assert [inversion.timestep(i) for i in range(steps)] == [spacing * i for i in range(steps)]
    generator = torch.Generator().manual_seed(0)
    for index in range(steps):
        x = torch.randn(1, 4, 8, 8, generator=generator)
        noise = torch.randn(1, 4, 8, 8, generator=generator)
        t = spacing * index
        a_current = alphas[t - spacing] if t - spacing >= 0 else alphas[0]
        a_next = alphas[t]
        clean = (x.double() - (1 - a_current).sqrt() * noise.double()) / a_current.sqrt()
        expected = a_next.sqrt() * clean + (1 - a_next).sqrt() * noise.double()
        assert (inversion.step(x, noise, index).double() - expected).abs().max().item() <= 1e-5


class CpuModel:
    """Stands for a model where only the device and dtype are read (by `ddim`)."""

    device = torch.device("cpu")
    dtype = torch.float32


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


@pytest.fixture(scope="module")
def reference_image() -> Image.Image:
    """A non-square RGBA image, as users give them."""
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 255, size=(60, 90, 4), dtype=np.uint8)
    pixels[..., 3] = 200
    return Image.fromarray(pixels, mode="RGBA")


SPEC = TransferSpec(prompts=TARGETS, width=64, height=64, steps=3, offset=1)


@pytest.fixture(scope="module")
def trajectory(sd: StableDiffusion_1, reference_image: Image.Image) -> ReferenceTrajectory:
    return make_trajectory(sd, reference_image, CAPTION, spec=SPEC)


def test_inversion_loop_follows_the_solver(sd: StableDiffusion_1, reference_image: Image.Image) -> None:
    solver = ddim(sd, 3)
    latents = encode_image(sd, reference_image, width=64, height=64)
    trajectory = invert(sd, latents, CAPTION, solver=solver, guidance=2.0)
    assert trajectory.latents.shape == (4, 4, 8, 8) and trajectory.timesteps == [int(t) for t in solver.timesteps]
    assert torch.equal(trajectory.latents[-1:], latents)  # the last latent is the encoded image
    # independent loop: noise predicted at each ascending timestep with guidance 2, DDIM re-noising
    alphas = alphas_cumprod()
    x = latents.double()
    embedding = sd.compute_clip_text_embedding(CAPTION, negative_text="")
    for k, t in enumerate(reversed(trajectory.timesteps)):
        sd.unet.set_timestep(torch.tensor([t]))
        sd.unet.set_clip_text_embedding(embedding)
        with torch.no_grad():
            unconditional, conditional = sd.unet(torch.cat([x, x]).float()).chunk(2)
        noise = (unconditional + 2.0 * (conditional - unconditional)).double()
        a_current = alphas[max(t - 333, 0)]
        x = alphas[t].sqrt() * (x - (1 - a_current).sqrt() * noise) / a_current.sqrt() + (1 - alphas[t]).sqrt() * noise
        assert (trajectory.latents[-2 - k] - x).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())


def test_reference_ends_on_the_encoded_image_and_ignores_the_targets(
    sd: StableDiffusion_1, reference_image: Image.Image, trajectory: ReferenceTrajectory
) -> None:
    latents, spec = transfer_latents(sd, trajectory, SPEC)
    assert spec.image_prompts() == [CAPTION, *TARGETS] and spec.guidance == 10.0
    assert spec.style == StyleAlignedOptions(shared_score_shift=math.log(2), share_group_norm=True).resolved("sd1")
    assert torch.equal(latents[0], encode_image(sd, reference_image, width=64, height=64)[0])
    other, _ = transfer_latents(sd, trajectory, replace(SPEC, prompts=["A woman playing saxophone", TARGETS[1]]))
    assert torch.equal(other[0], latents[0])  # the reference does not depend on the targets
    assert not torch.equal(other[1], latents[1])  # the changed target changes
    assert torch.equal(other[2], latents[2])  # and the other target does not: influence flows from the reference only


def test_saved_trajectory_gives_bit_identical_sets(
    sd: StableDiffusion_1, trajectory: ReferenceTrajectory, tmp_path: Path
) -> None:
    path = tmp_path / "trajectory.safetensors"
    trajectory.save(path)
    loaded = ReferenceTrajectory.load(path)
    assert torch.equal(loaded.latents, trajectory.latents) and loaded.caption == CAPTION
    assert (loaded.timesteps, loaded.model, loaded.guidance) == (trajectory.timesteps, trajectory.model, 2.0)
    first, _ = transfer_latents(sd, trajectory, SPEC)
    again, _ = transfer_latents(sd, loaded, SPEC)
    assert torch.equal(first, again)


def test_a_trajectory_for_another_schedule_size_or_model_is_refused(
    sd: StableDiffusion_1, trajectory: ReferenceTrajectory
) -> None:
    with pytest.raises(ValueError, match="made for 3 steps, this set has 4"):
        transfer_latents(sd, trajectory, replace(SPEC, steps=4))
    with pytest.raises(ValueError, match="made at 64x64 px, this set is 64x96 px"):
        transfer_latents(sd, trajectory, replace(SPEC, height=96))
    with pytest.raises(ValueError, match="made with another model"):
        transfer_latents(sd, replace(trajectory, model="sdxl-000000000000"), SPEC)
    with pytest.raises(ValueError, match="offset must be"):
        transfer_latents(sd, trajectory, replace(SPEC, offset=3))


def test_non_square_sets(sd: StableDiffusion_1, reference_image: Image.Image) -> None:
    spec = replace(SPEC, width=64, height=96)
    trajectory = make_trajectory(sd, reference_image, CAPTION, spec=spec)
    generated = transfer_set(sd, trajectory, spec)
    assert [image.size for image in generated.images] == [(64, 96)] * 3


def test_reference_images_are_fitted_to_the_size() -> None:
    gray = Image.new("L", (100, 50), 128)
    palette = Image.new("P", (30, 60))
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: white
    for image in (gray, palette, rgba):
        for fit in ("crop", "resize"):
            fitted = fit_image(image, 64, 48, fit=fit)  # type: ignore[arg-type]
            assert fitted.size == (64, 48) and fitted.mode == "RGB"
    assert fit_image(rgba, 8, 8).getpixel((4, 4)) == (255, 255, 255)
    stripes = Image.new("RGB", (300, 100), "black")
    stripes.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    assert fit_image(stripes, 10, 10, fit="crop").getpixel((5, 5)) == (255, 255, 255)  # the centre is kept
    assert fit_image(stripes, 30, 10, fit="resize").getpixel((1, 5)) == (0, 0, 0)  # the whole width is kept


def test_transfer_command_end_to_end(
    sd1_converted: Path, reference_image: Image.Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path = tmp_path / "reference.png"
    reference_image.save(image_path)
    common = ["--model", str(sd1_converted), "--size", "64x64", "--offset", "1", "--seed", "3"]
    prompts = [argument for prompt in TARGETS for argument in ("--prompt", prompt)]
    first, second = tmp_path / "first", tmp_path / "second"
    saved = tmp_path / "trajectory.safetensors"
    cli(["transfer", *common, "--image", str(image_path), "--caption", CAPTION, "--steps", "3", *prompts,
         "--out", str(first), "--save-trajectory", str(saved)])  # fmt: skip
    assert "inverting" in capsys.readouterr().err
    cli(["transfer", *common, "--trajectory", str(saved), *prompts, "--out", str(second)])
    sidecar = json.loads((first / "set.json").read_text())
    assert sidecar["command"] == "transfer" and sidecar["caption"] == CAPTION and sidecar["offset"] == 1
    assert sidecar["style"]["share_group_norm"] is True and sidecar["guidance"] == 10.0 and sidecar["steps"] == 3
    for name in sidecar["images"]:
        with Image.open(first / name) as a, Image.open(second / name) as b:
            assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    assert (first / "grid.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli(["transfer", *common, *prompts, "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "--image and --caption, or" in capsys.readouterr().err
