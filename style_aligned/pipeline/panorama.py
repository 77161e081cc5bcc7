"""Panoramas in a reference's style: MultiDiffusion views that attend to a recorded reference image.

A reference image (generated from its prompt, or a real image inverted with DDIM) is denoised alone at every step
while the StyleAligned adapter records its features. The wide canvas is then denoised as overlapping square views,
`view_batch` at a time, each view a target that attends to the recorded reference, and the views are averaged back
into the canvas by Refiners' `MultiDiffusion` (see [[arXiv:2302.08113] MultiDiffusion](
https://arxiv.org/abs/2302.08113), and the MultiDiffusion example of the StyleAligned reference implementation).
The U-Net's memory is that of one batch of views, whatever the width.
"""

import itertools
import math
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion.multi_diffusion import DiffusionTarget, MultiDiffusion
from torch import Tensor

from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.options import FLUX_KINDS, ModelKind, StyleAlignedOptions, setting
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.images import Fit
from style_aligned.pipeline.inversion import ReferenceTrajectory, encode_image, invert
from style_aligned.pipeline.model import Model, StableDiffusion, autoencoder_in_float32, kind_of
from style_aligned.pipeline.progress import Preview, Progress, ProgressEvent
from style_aligned.pipeline.solvers import ddim
from style_aligned.pipeline.spec import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS
from style_aligned.pipeline.transfer import INVERSION_GUIDANCE, OFFSET

DEFAULT_PANORAMA: dict[ModelKind, tuple[int, int]] = {"sd1": (2048, 512), "sdxl": (4096, 1024)}
"""The panorama size of the reference implementation's MultiDiffusion example (width, height in pixels), scaled to
SDXL's resolution."""
DEFAULT_STRIDE: dict[ModelKind, int] = {"sd1": 64, "sdxl": 128}
"""The view stride in pixels: MultiDiffusion's 8 latent pixels for SD1-class models, scaled to SDXL's resolution."""
DEFAULT_VIEW_BATCH = 4


@dataclass(kw_only=True)
class PanoramaSpec:
    """A panorama in the style of a reference image.

    Attributes:
        prompt: The prompt of the panorama (every view).
        reference_prompt: The prompt of the reference image (the caption of `reference_image`, when given).
        reference_image: A real image to use as the reference instead of generating it: it is fitted to the view
            size, encoded and inverted with DDIM, and the reference follows its trajectory (as in style transfer).
        negative_prompt: The negative prompt of the reference and the views.
        seed: The seed of the initial noise (the reference's first, then the canvas's).
        steps: The number of DDIM steps.
        guidance: The classifier-free guidance scale (default: 5 for SDXL, 7.5 for SD1).
        width: The panorama width in pixels, a multiple of 8 (default: 2048 for SD1, 4096 for SDXL).
        height: The panorama height in pixels, a multiple of 8 (default: 512 for SD1, 1024 for SDXL).
        view_size: The side of the square views in pixels (default: the model's image size, 512 or 1024), limited
            to the panorama's width and height; the reference image is made at the views' size.
        stride: The step between views in pixels, at most the view size (default: 64 for SD1, 128 for SDXL).
        view_batch: How many views run through the U-Net together (memory grows with it, not with the width).
        style: How the views share the reference's style.
        offset: With `reference_image`: the trajectory index the reference starts from.
        inversion_guidance: With `reference_image`: the guidance scale of the inversion.
        fit: With `reference_image`: how it is fitted to the view size, `"crop"` or `"resize"`.
    """

    prompt: str = setting(help="prompt of the panorama")
    reference_prompt: str = setting(help="prompt of the reference image (the caption of a reference image)")
    reference_image: str | Path | Image.Image | None = setting(
        None, help="a real reference image, inverted with DDIM (instead of generating the reference)"
    )
    negative_prompt: str = setting("", help="negative prompt of the reference and the panorama")
    seed: int = setting(0, help="seed of the initial noise (the reference's first, then the canvas's)")
    steps: int = setting(DEFAULT_STEPS["sd1"], help="DDIM steps")
    guidance: float | None = setting(None, help="classifier-free guidance (default: 5 SDXL, 7.5 SD1)")
    width: int | None = setting(None, help="panorama width in pixels (default: 2048 SD1, 4096 SDXL)")
    height: int | None = setting(None, help="panorama height in pixels (default: 512 SD1, 1024 SDXL)")
    view_size: int | None = setting(None, help="square view side (default: 512 SD1, 1024 SDXL)")
    stride: int | None = setting(None, help="step between views (default: 64 SD1, 128 SDXL)")
    view_batch: int = setting(DEFAULT_VIEW_BATCH, help="views per U-Net call")
    style: StyleAlignedOptions = setting(
        help="how the views share the reference's style (StyleAligned options)", factory=StyleAlignedOptions
    )
    offset: int = setting(OFFSET["sd1"], help="trajectory index the reference starts from")  # SD1's is SDXL's
    inversion_guidance: float = setting(INVERSION_GUIDANCE["sd1"], help="guidance of the inversion")
    fit: Fit = setting("crop", help="fit the reference image to the view size: cover and crop, or stretch (resize)")

    def resolved(self, sd: "Model | ModelKind") -> "PanoramaSpec":
        """This spec with the model's defaults filled in, checked.

        Raises:
            ValueError: If a setting is out of range, or the model is FLUX.1 (panoramas run on SD1 and SDXL U-Nets).
        """
        kind = kind_of(sd)
        if kind in FLUX_KINDS:
            raise ValueError("panoramas run on SD1 and SDXL U-Nets: FLUX.1 is not supported")
        default_width, default_height = DEFAULT_PANORAMA[kind]
        guidance = DEFAULT_GUIDANCE[kind] if self.guidance is None else self.guidance
        spec = replace(
            self,
            width=self.width or default_width,
            height=self.height or default_height,
            view_size=self.view_size or DEFAULT_SIZE[kind],
            stride=self.stride or DEFAULT_STRIDE[kind],
            guidance=guidance,
            style=self.style.resolved(kind),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Check the settings given (those left to the model's defaults are checked by `resolved`).

        Raises:
            ValueError: If a setting is out of range.
        """
        sizes = (("width", self.width), ("height", self.height), ("view_size", self.view_size), ("stride", self.stride))
        for name, value in sizes:
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"the panorama's {name} must be a multiple of 8 pixels, got {value}")
        if self.stride is not None and self.view_size is not None and self.stride > self.view_size:
            raise ValueError(f"the stride ({self.stride} px) must not exceed the view size ({self.view_size} px)")
        if self.view_batch < 1:
            raise ValueError(f"view_batch must be at least 1, got {self.view_batch}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.reference_image is not None and not 0 <= self.offset < self.steps:
            raise ValueError(f"offset must be in [0, steps), got {self.offset} for {self.steps} steps")

    def view_shape(self) -> tuple[int, int]:
        """The (height, width) of each view in pixels, for a resolved spec."""
        assert self.width is not None and self.height is not None and self.view_size is not None
        return min(self.view_size, self.height), min(self.view_size, self.width)


def view_offsets(length: int, view: int, stride: int) -> list[int]:
    """The offsets of the views along one axis: every `stride`, plus one flush with the end if needed.

    Refiners' `MultiDiffusion.generate_offset_grid` leaves the end uncovered when `(length - view) % stride != 0`;
    the last view is added flush with the end here, so that every latent pixel is denoised.
    """
    offsets = list(range(0, length - view + 1, stride))
    if offsets[-1] + view < length:
        offsets.append(length - view)
    return offsets


def panorama_views(spec: PanoramaSpec) -> list[tuple[int, int]]:
    """The (top, left) offsets of the views of a resolved spec in pixels, row by row."""
    assert spec.width is not None and spec.height is not None and spec.stride is not None
    view_height, view_width = (side // 8 for side in spec.view_shape())
    stride = spec.stride // 8
    rows = view_offsets(spec.height // 8, view_height, stride)
    columns = view_offsets(spec.width // 8, view_width, stride)
    return [(top * 8, left * 8) for top, left in itertools.product(rows, columns)]


def panorama_targets(spec: PanoramaSpec, clip_text_embedding: Tensor) -> list[DiffusionTarget]:
    """The views of a resolved spec as Refiners `DiffusionTarget`s (sizes and offsets in latent pixels)."""
    assert spec.guidance is not None
    view_height, view_width = (side // 8 for side in spec.view_shape())
    return [
        DiffusionTarget(
            size=(view_height, view_width),
            offset=(top // 8, left // 8),
            clip_text_embedding=clip_text_embedding,
            condition_scale=spec.guidance,
        )
        for top, left in panorama_views(spec)
    ]


@dataclass(kw_only=True)
class StyleAlignedMultiDiffusion(MultiDiffusion[Any, DiffusionTarget]):
    """Refiners' MultiDiffusion whose views run `view_batch` at a time as targets of the recorded reference.

    Calling it (one denoising step of the canvas) denoises every view in batches, with the StyleAligned adapter's
    reference cache in replay mode, then lets `MultiDiffusion.__call__` paste and average the views exactly as it
    does for one view at a time.

    Attributes:
        conditioning: The keyword arguments of the model's call for a batch of `n` views.
        view_batch: How many views run together.
    """

    conditioning: Callable[[int], dict[str, Tensor]]
    view_batch: int = DEFAULT_VIEW_BATCH
    on_batch: Callable[[int, int], None] | None = None
    """Called with (batch number, batches) after each batch of views."""
    _denoised: dict[int, Tensor] = field(default_factory=lambda: {})

    def __call__(self, x: Tensor, /, noise: Tensor, step: int, targets: list[DiffusionTarget]) -> Tensor:
        batches = [targets[start : start + self.view_batch] for start in range(0, len(targets), self.view_batch)]
        for number, batch in enumerate(batches, start=1):
            views = torch.cat([target.crop(x) for target in batch])  # (views, 4, view height, view width)
            denoised = self.ldm(views, step, **self.conditioning(len(batch)), condition_scale=batch[0].condition_scale)
            self._denoised.update({id(target): view[None] for target, view in zip(batch, denoised, strict=True)})
            if self.on_batch:
                self.on_batch(number, len(batches))
        try:
            return super().__call__(x, noise=noise, step=step, targets=targets)
        finally:
            self._denoised.clear()

    def diffuse_target(self, x: Tensor, step: int, target: DiffusionTarget) -> Tensor:
        return self._denoised[id(target)]


@dataclass(kw_only=True)
class Panorama:
    """A generated panorama, its reference image, and the resolved spec that made them."""

    reference: Image.Image
    panorama: Image.Image
    spec: PanoramaSpec
    views: list[tuple[int, int]]
    """The (top, left) offset of every view, in pixels."""


def reference_trajectory(sd: StableDiffusion, spec: PanoramaSpec) -> ReferenceTrajectory:
    """Encode and invert the spec's reference image at the view size (see `PanoramaSpec.reference_image`).

    Raises:
        ValueError: If the image cannot be read.
    """
    assert spec.reference_image is not None
    image = spec.reference_image
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except OSError as error:
            raise ValueError(f"cannot read the reference image {spec.reference_image}: {error}") from None
    view_height, view_width = spec.view_shape()
    latents = encode_image(sd, image, width=view_width, height=view_height, fit=spec.fit)
    solver = ddim(sd, spec.steps)
    return invert(
        sd,
        latents,
        spec.reference_prompt,
        solver=solver,
        guidance=spec.inversion_guidance,
        width=view_width,
        height=view_height,
    )


def generate_panorama(
    sd: StableDiffusion, spec: PanoramaSpec, *, progress: Progress | None = None, preview: Preview | None = None
) -> Panorama:
    """Generate a panorama whose views share the style of a reference image.

    The DDIM solver of the reference examples is used; the model's solver is restored afterwards, and StyleAligned
    is ejected whether this succeeds or fails.

    Args:
        sd: A `StableDiffusion_XL` or `StableDiffusion_1`.
        spec: What to generate.
        progress: Called after each U-Net call (the reference, then each batch of views) and each decoded image.
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The reference image (the plain image of its prompt, or the reconstructed input image), the panorama, and
        the views' offsets.

    Raises:
        ValueError: If a setting is out of range or the reference image cannot be read.
        RuntimeError: If the U-Net already carries StyleAligned.
    """
    spec = spec.resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    adapter = StyleAlignedAdapter(sd.unet, spec.style)  # checks the layers first; nothing changes until injected
    trajectory = reference_trajectory(sd, spec) if spec.reference_image is not None else None
    view_height, view_width = spec.view_shape()
    conditioning = SetConditioning(
        sd, [spec.reference_prompt, spec.prompt], spec.negative_prompt, width=view_width, height=view_height
    )
    generator = torch.Generator().manual_seed(spec.seed)
    reference = torch.randn(1, 4, view_height // 8, view_width // 8, generator=generator)
    canvas = torch.randn(1, 4, spec.height // 8, spec.width // 8, generator=generator)
    reference, canvas = (t.to(device=sd.device, dtype=sd.dtype) for t in (reference, canvas))
    if trajectory is not None:
        reference = trajectory.latents[spec.offset][None].to(device=sd.device, dtype=sd.dtype)
    targets = panorama_targets(spec, conditioning([1])["clip_text_embedding"])
    run = _PanoramaRun(sd, spec, adapter, conditioning, targets=targets, trajectory=trajectory)
    reference, canvas = run.denoise(reference, canvas, progress=progress, preview=preview)
    images: list[Image.Image] = []
    with torch.no_grad(), autoencoder_in_float32(sd):
        for index, latents in enumerate((reference, canvas)):
            images.append(sd.lda.latents_to_image(latents.to(sd.lda.dtype)))
            run.report(progress, "decode", run.total - 1 + index, 0, index + 1, 2)
    views = [(target.offset[0] * 8, target.offset[1] * 8) for target in targets]
    return Panorama(reference=images[0], panorama=images[1], spec=spec, views=views)


class _PanoramaRun:
    """The denoising of a panorama: the reference alone, recorded, then the views in batches, at every step."""

    def __init__(
        self,
        sd: StableDiffusion,
        spec: PanoramaSpec,
        adapter: StyleAlignedAdapter[Any],
        conditioning: SetConditioning,
        *,
        targets: list[DiffusionTarget],
        trajectory: ReferenceTrajectory | None,
    ) -> None:
        self.sd, self.spec, self.adapter, self.conditioning = sd, spec, adapter, conditioning
        self.targets, self.trajectory = targets, trajectory
        self.solver = ddim(sd, spec.steps)
        self.steps = list(self.solver.inference_steps)
        self.num_batches = math.ceil(len(targets) / spec.view_batch)
        self.total = len(self.steps) * (1 + self.num_batches) + 2

    def report(self, progress: Progress | None, phase: str, done: int, step: int, chunk: int, chunks: int) -> None:
        if progress:
            steps = len(self.steps)
            progress(
                ProgressEvent(
                    done=done, total=self.total, phase=phase, step=step, steps=steps, chunk=chunk, chunks=chunks
                )
            )

    def denoise(
        self, reference: Tensor, canvas: Tensor, *, progress: Progress | None, preview: Preview | None
    ) -> tuple[Tensor, Tensor]:
        """Denoise the reference and the canvas; returns their final latents."""
        sd, spec, cache = self.sd, self.spec, self.adapter.reference_cache
        trajectory = None if self.trajectory is None else self.trajectory.latents.to(device=sd.device, dtype=sd.dtype)
        position = {"step": 0}

        def on_batch(chunk: int, chunks: int) -> None:
            number = position["step"]
            self.report(progress, "targets", (number - 1) * (1 + chunks) + 1 + chunk, number, chunk, chunks)

        diffusion = StyleAlignedMultiDiffusion(
            ldm=sd, conditioning=lambda n: self.conditioning([1] * n), view_batch=spec.view_batch, on_batch=on_batch
        )
        previous_solver, sd.solver = sd.solver, self.solver
        try:
            with injected(self.adapter), torch.no_grad():
                for number, step in enumerate(self.steps, start=1):
                    position["step"] = number
                    with cache.record():
                        reference = sd(reference, step, **self.conditioning([0]), condition_scale=spec.guidance)
                    if trajectory is not None:
                        reference = trajectory[max(spec.offset + 1, step - self.solver.first_inference_step + 1)][None]
                    if preview:
                        preview(reference)
                    self.report(
                        progress, "reference", (number - 1) * (1 + self.num_batches) + 1, number, 0, self.num_batches
                    )
                    with cache.replay():
                        canvas = diffusion(canvas, noise=canvas, step=step, targets=self.targets)
                    cache.clear()
        finally:
            sd.solver = previous_solver
        return reference, canvas


@contextmanager
def injected(adapter: StyleAlignedAdapter[Any]) -> Generator[None]:
    """Inject the adapter for the block, and eject it however the block ends."""
    adapter.inject()
    try:
        yield
    finally:
        adapter.eject()


REFERENCE_FILE = "reference.png"
PANORAMA_FILE = "panorama.png"
PANORAMA_SIDECAR = "panorama.json"


def panorama_sidecar(command: str, spec: PanoramaSpec, views: list[tuple[int, int]], **details: Any) -> dict[str, Any]:
    """Everything needed to reproduce a panorama: the settings, the views, the files and the versions."""
    from style_aligned.pipeline.set_files import sidecar_versions

    return {
        "command": command,
        **{key: value for key, value in asdict(spec).items()},
        "views": [list(view) for view in views],
        "reference": REFERENCE_FILE,
        "panorama": PANORAMA_FILE,
        **details,
        "versions": sidecar_versions(),
    }


def save_panorama(out: Path, panorama: Panorama, **details: Any) -> None:
    """Write a panorama's folder: `reference.png`, `panorama.png` and the sidecar `panorama.json`."""
    from style_aligned.pipeline.images import save_png
    from style_aligned.pipeline.set_files import write_json

    out.mkdir(parents=True, exist_ok=True)
    save_png(panorama.reference, out / REFERENCE_FILE)
    save_png(panorama.panorama, out / PANORAMA_FILE)
    write_json(out / PANORAMA_SIDECAR, panorama_sidecar("panorama", panorama.spec, panorama.views, **details))
