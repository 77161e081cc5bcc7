"""Panoramas on the random-weight SD1 pipeline: 64x256 px, 64x64 px views, 2 DDIM steps."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1
from refiners.foundationals.latent_diffusion.multi_diffusion import DiffusionTarget, MultiDiffusion
from refiners.foundationals.latent_diffusion.stable_diffusion_1.multi_diffusion import SD1MultiDiffusion

from style_aligned import SharedAttentionAdapter, StyleAlignedAdapter
from style_aligned.cli import main as cli
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.panorama import (
    PanoramaSpec,
    StyleAlignedMultiDiffusion,
    generate_panorama,
    panorama_targets,
    view_offsets,
)
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.solvers import ddim

REFERENCE, PROMPT = "a watercolor painting of a lake", "a mountain range at dawn"


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


def spec(**changes: Any) -> PanoramaSpec:
    settings: dict[str, Any] = dict(
        prompt=PROMPT, reference_prompt=REFERENCE, width=256, height=64, view_size=64, stride=32, steps=2
    )
    return PanoramaSpec(**(settings | changes))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def plain_image(sd: StableDiffusion_1, prompt: str, seed: int, steps: int) -> Image.Image:
    """The model's own image of a prompt, without any adapter: the same DDIM solver and the seed's first draw."""
    solver, sd.solver = sd.solver, ddim(sd, steps)
    try:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        embedding = sd.compute_clip_text_embedding(prompt, negative_text="")
        with torch.no_grad():
            for step in sd.steps:
                x = sd(x, step, clip_text_embedding=embedding, condition_scale=7.5)
            return sd.lda.latents_to_image(x)
    finally:
        sd.solver = solver


def test_views_cover_the_canvas() -> None:
    assert view_offsets(32, 8, 4) == [0, 4, 8, 12, 16, 20, 24]
    assert view_offsets(30, 8, 4) == [0, 4, 8, 12, 16, 20, 22]  # the last view flush with the end
    assert view_offsets(8, 8, 4) == [0]


class StubModel:
    """Stands for a model: denoises each view on its own (a fixed function of the view)."""

    def __call__(self, x: torch.Tensor, step: int, *, condition_scale: float, **_: Any) -> torch.Tensor:
        return x * 0.5 + x.mean(dim=(1, 2, 3), keepdim=True) * condition_scale + step


class OneViewAtATime(MultiDiffusion[Any, DiffusionTarget]):
    def diffuse_target(self, x: torch.Tensor, step: int, target: DiffusionTarget) -> torch.Tensor:
        return self.ldm(x, step, condition_scale=target.condition_scale)


@pytest.mark.parametrize("view_batch", [1, 2, 3, 7])
@pytest.mark.parametrize(("width", "height", "stride"), [(256, 64, 32), (200, 120, 48), (64, 64, 8)])
def test_batched_views_are_averaged_as_multidiffusion_does(
    view_batch: int, width: int, height: int, stride: int
) -> None:
    resolved = PanoramaSpec(
        prompt="", reference_prompt="", width=width, height=height, view_size=64, stride=stride, guidance=2.0
    )
    targets = panorama_targets(resolved, torch.zeros(2, 77, 8))
    canvas = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    ours = StyleAlignedMultiDiffusion(ldm=StubModel(), conditioning=lambda _: {}, view_batch=view_batch)
    theirs = OneViewAtATime(ldm=StubModel())
    expected = theirs(canvas, noise=canvas, step=3, targets=targets)
    # equal up to the float rounding of the stub's reduction over a batch
    assert (ours(canvas, noise=canvas, step=3, targets=targets) - expected).abs().max().item() <= 1e-6
    assert not torch.equal(expected, canvas)
    covered = torch.zeros(height // 8, width // 8, dtype=torch.bool)
    for target in targets:
        top, left = target.offset
        covered[top : top + target.size[0], left : left + target.size[1]] = True
    assert bool(covered.all())  # every latent pixel is in some view


@pytest.fixture(scope="module")
def in_threes(sd: StableDiffusion_1) -> dict[str, Any]:
    """A panorama with views in batches of 3, the progress it reported and the U-Net batch sizes it ran."""
    events: list[ProgressEvent] = []
    rows: list[int] = []
    hook = sd.unet.register_forward_pre_hook(lambda _, inputs: rows.append(inputs[0].shape[0]))
    try:
        result = generate_panorama(sd, spec(view_batch=3), progress=events.append)
    finally:
        hook.remove()
    return {"result": result, "events": events, "rows": rows}


def test_panorama_end_to_end_with_a_plain_reference(sd: StableDiffusion_1, in_threes: dict[str, Any]) -> None:
    result, events = in_threes["result"], in_threes["events"]
    assert result.panorama.size == (256, 64) and result.reference.size == (64, 64)
    assert result.views == [(0, left) for left in range(0, 193, 32)]  # 7 views of 64x64 px
    assert not list(sd.unet.layers(SharedAttentionAdapter))
    # per step: the reference, then 3 batches of views (3, 3, 1); then 2 decoded images
    assert [e.phase for e in events] == (["reference"] + ["targets"] * 3) * 2 + ["decode"] * 2
    assert [e.done for e in events] == list(range(1, 11)) and {e.total for e in events} == {10}
    plain = plain_image(sd, REFERENCE, seed=0, steps=2)
    assert np.abs(pixels(result.reference) - pixels(plain)).max() == 0


def test_view_batch_does_not_change_the_panorama(sd: StableDiffusion_1, in_threes: dict[str, Any]) -> None:
    solver = sd.solver
    one = generate_panorama(sd, spec(view_batch=1))
    three = in_threes["result"]
    assert sd.solver is solver
    assert max(in_threes["rows"]) == 2 * 3  # the U-Net sees at most `view_batch` views (with guidance)
    assert np.abs(pixels(one.panorama) - pixels(three.panorama)).max() <= 1
    assert np.abs(pixels(one.reference) - pixels(three.reference)).max() == 0


def test_views_are_averaged_as_refiners_multidiffusion_averages_them(sd: StableDiffusion_1) -> None:
    resolved = spec(view_batch=3).resolved(sd)
    conditioning = SetConditioning(sd, [REFERENCE, PROMPT], "", width=64, height=64)
    targets = panorama_targets(resolved, conditioning([1])["clip_text_embedding"])
    generator = torch.Generator().manual_seed(3)
    reference, canvas = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 32, generator=generator)
    adapter = StyleAlignedAdapter(sd.unet, resolved.style)
    solver, sd.solver = sd.solver, ddim(sd, 2)
    try:
        adapter.inject()
        step = sd.steps[0]
        with torch.no_grad():
            with adapter.reference_cache.record():
                sd(reference, step, **conditioning([0]), condition_scale=7.5)
            with adapter.reference_cache.replay():
                ours = StyleAlignedMultiDiffusion(ldm=sd, conditioning=lambda n: conditioning([1] * n), view_batch=3)(
                    canvas, noise=canvas, step=step, targets=targets
                )
                # Refiners' own MultiDiffusion, one view per U-Net call (its SD1 variant runs at guidance 7.5)
                theirs = SD1MultiDiffusion(sd)(canvas, noise=canvas, step=step, targets=targets)
    finally:
        adapter.eject()
        sd.solver = solver
    # equal up to the float rounding of U-Net calls on 3 views or on 1 (values of magnitude about 5)
    assert (ours - theirs).abs().max().item() <= 2e-4
    assert (ours - canvas).abs().max().item() > 0


def test_panorama_command(sd1_converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "panorama"
    arguments = ["panorama", "--model", str(sd1_converted), "--out", str(out), "--prompt", PROMPT, "--steps", "2"]
    cli([*arguments, "--reference-prompt", REFERENCE, "--size", "256x64", "--view-size", "64", "--stride", "32"])
    assert Image.open(out / "panorama.png").size == (256, 64) and Image.open(out / "reference.png").size == (64, 64)
    sidecar = json.loads((out / "panorama.json").read_text())
    assert sidecar["command"] == "panorama" and sidecar["reference_prompt"] == REFERENCE
    assert len(sidecar["views"]) == 7 and sidecar["view_batch"] == 4 and sidecar["width"] == 256
    assert sidecar["style"]["share_group_norm"] is True
    # a real reference image, inverted
    image = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(image)
    inverted = tmp_path / "inverted"
    cli(
        [
            *arguments[:4],
            str(inverted),
            *arguments[5:],
            "--image",
            str(image),
            "--caption",
            "noise",
            "--size",
            "128x64",
            "--offset",
            "1",
        ]
    )
    sidecar = json.loads((inverted / "panorama.json").read_text())
    assert sidecar["reference_prompt"] == "noise" and sidecar["style"]["shared_score_shift"] == pytest.approx(
        0.6931, 1e-3
    )
    assert Image.open(inverted / "panorama.png").size == (128, 64)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference-prompt", REFERENCE, "--stride", "128"], "must not exceed the view size"),
        (["--reference-prompt", REFERENCE, "--view-batch", "0"], "view_batch must be"),
        (["--reference-prompt", REFERENCE, "--size", "250x64"], "multiple of 8"),
        (["--caption", "x"], "--caption describes a reference --image"),
        ([], "give the reference"),
        (["--image", "missing.png", "--caption", "x"], "does not exist"),
    ],
)
def test_panorama_command_errors(
    sd1_converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    arguments = ["panorama", "--model", str(sd1_converted), "--out", str(tmp_path / "o"), "--prompt", PROMPT]
    with pytest.raises(SystemExit) as exit_info:
        cli([*arguments, "--size", "256x64", "--view-size", "64", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o" / "panorama.png").exists()
