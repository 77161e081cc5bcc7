"""Generate a style-consistent set: one U-Net call per chunk of targets and step, the reference riding with the first
chunk and recorded for the others, at constant memory, with any of the solvers of `style_aligned.pipeline.solvers`."""

import contextlib
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.solvers import Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.lcm import SDXLLcmAdapter
from torch import Tensor

from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.layers.reference_cache import mixture_weights
from style_aligned.options import ModelKind, StyleAlignedOptions, model_kind
from style_aligned.pipeline.composition import Composition, ControlSpec, Extras, IPAdapterSpec, LoraSpec
from style_aligned.pipeline.solvers import (
    SOLVERS,
    SPACINGS,
    ExactDDIM,
    SolverName,
    Spacing,
    fresh_copy,
    image_generators,
    is_stochastic,
    make_solver,
    solver_step,
)

StableDiffusion = StableDiffusion_XL | StableDiffusion_1
DEFAULT_SIZE: dict[ModelKind, int] = {"sdxl": 1024, "sd1": 512}
"""The image size of the reference examples, in pixels (square)."""
DEFAULT_GUIDANCE: dict[ModelKind, float] = {"sdxl": 5.0, "sd1": 7.5}
"""The classifier-free guidance scale of the reference examples."""


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """Where a generation stands: one unit of work per U-Net call and per decoded image.

    Attributes:
        done: Units done.
        total: Units in all.
        phase: `"reference"` (a U-Net call on the reference alone, in a set of one image), `"targets"` (a U-Net call on
            a chunk of targets; the first chunk carries the reference) or `"decode"`.
        step: The denoising step (1-based; steps done when decoding).
        steps: The number of denoising steps.
        chunk: The U-Net call of the step (1-based), or the image decoded.
        chunks: The number of U-Net calls per step, or of images when decoding.
    """

    done: int
    total: int
    phase: str
    step: int
    steps: int
    chunk: int
    chunks: int


Progress = Callable[[ProgressEvent], None]


@dataclass(kw_only=True)
class SetSpec:
    """A style-consistent set to generate.

    Attributes:
        prompts: One prompt per image. Without `reference_prompt` or `reference_prompts`, the first is the reference.
        reference_prompt: The prompt of an extra reference image placed before the others.
        reference_prompts: The prompts of several reference images placed before the others, whose styles the
            targets blend (instead of `reference_prompt`).
        reference_weights: One relative weight per reference (default: equal); see `ReferenceCache.mixture_weights`.
        negative_prompt: The negative prompt of every image.
        seed: The seed of the initial noise (image `i` gets the `i`-th draw, whatever the chunk size), and of the noise
            a stochastic solver draws for each image (see `style_aligned.pipeline.solvers.image_seed`).
        steps: The number of denoising steps.
        guidance: The classifier-free guidance scale (default: 5 for SDXL, 7.5 for SD1, as in the reference examples).
            At or below 1 the set runs without classifier-free guidance: one batch half, the conditional one. With a
            model that has an LCM guidance embedding (Refiners' `SDXLLcmAdapter`), it goes to the embedding instead.
        width: The image width in pixels, a multiple of 8 (default: 1024 for SDXL, 512 for SD1).
        height: The image height in pixels, a multiple of 8 (default: as `width`).
        chunk_size: How many targets run together (default: all); memory does not grow with the set beyond it.
        style: How the images share the reference's style; options left to the model kind take its defaults.
        controls: ControlNets guiding the targets, each with one control image for all targets or one per target.
        loras: LoRAs applied while the set is generated.
        ip_adapter: An IP-Adapter image prompt for every image.
        solver: `"ddim"` (the reference examples' DDIM, exact to diffusers), `"dpm"` (DPM-Solver++ 2M), `"euler"` or
            `"lcm"`; see `style_aligned.pipeline.solvers.make_solver`.
        timestep_spacing: `"leading"`, `"trailing"` or `"linspace"` (default: the solver's own; DDIM's is leading).
    """

    prompts: list[str]
    reference_prompt: str | None = None
    reference_prompts: list[str] | None = None
    reference_weights: list[float] | None = None
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 50
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    chunk_size: int | None = None
    style: StyleAlignedOptions = field(default_factory=StyleAlignedOptions)
    controls: list[ControlSpec] = field(default_factory=lambda: [])
    loras: list[LoraSpec] = field(default_factory=lambda: [])
    ip_adapter: IPAdapterSpec | None = None
    solver: SolverName = "ddim"
    timestep_spacing: Spacing | None = None

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the set runs with classifier-free guidance: a guidance scale above 1 (or not yet resolved)."""
        return self.guidance is None or self.guidance > 1

    def make_solver(self, sd: StableDiffusion) -> Solver:
        """A fresh solver of this set for the model's device and dtype."""
        return make_solver(self.solver, self.steps, spacing=self.timestep_spacing, device=sd.device, dtype=sd.dtype)

    def extras(self) -> Extras:
        """The ControlNets, LoRAs and IP-Adapter of the set."""
        return Extras(controls=list(self.controls), loras=list(self.loras), ip_adapter=self.ip_adapter)

    def image_prompts(self) -> list[str]:
        """The prompt of every image, the references first."""
        if self.reference_prompts is not None:
            return [*self.reference_prompts, *self.prompts]
        return ([self.reference_prompt] if self.reference_prompt is not None else []) + list(self.prompts)

    def num_references(self) -> int:
        """The number of references, the first images of the set."""
        return len(self.reference_prompts) if self.reference_prompts is not None else 1

    def mixture_weights(self) -> tuple[float, ...]:
        """The references' weights (equal by default), normalised to sum 1.

        Raises:
            ValueError: If there is not one weight per reference, or a weight is not a number > 0.
        """
        weights = self.reference_weights
        if weights is not None and len(weights) != self.num_references():
            raise ValueError(f"give one reference weight per reference: {len(weights)} for {self.num_references()}")
        return mixture_weights(weights or [1.0] * self.num_references())

    def resolved(self, sd: "StableDiffusion | ModelKind") -> "SetSpec":
        """This spec with the model's defaults filled in, checked (given a model kind, its defaults: the checks need
        no model).

        Raises:
            ValueError: If a setting is out of range.
        """
        kind = sd if isinstance(sd, str) else model_kind(sd)
        width = self.width or self.height or DEFAULT_SIZE[kind]
        height = self.height or width
        guidance = DEFAULT_GUIDANCE[kind] if self.guidance is None else self.guidance
        spec = replace(self, width=width, height=height, guidance=guidance, style=self.style.resolved(kind))
        spec.check()
        return spec

    def check(self) -> None:
        """Check every setting that can be checked without the model (the size only if given).

        Raises:
            ValueError: If a setting is out of range.
        """
        if not self.image_prompts():
            raise ValueError("a set needs at least one prompt")
        if self.reference_prompts is not None:
            if self.reference_prompt is not None:
                raise ValueError("give the reference as reference_prompt or reference_prompts, not both")
            if not self.reference_prompts:
                raise ValueError("reference_prompts needs at least one prompt")
            if len(self.reference_prompts) > 1 and self.controls:
                raise ValueError("ControlNets work with one reference; give a single reference prompt")
        self.mixture_weights()
        width, height = self.width or self.height, self.height or self.width
        if width is not None and height is not None and (width % 8 or height % 8 or width < 8 or height < 8):
            raise ValueError(f"the image size must be multiples of 8 pixels, got {width}x{height}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.guidance is not None and not self.guidance >= 0:
            raise ValueError(f"the guidance scale must be a number >= 0, got {self.guidance}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}: choose one of {', '.join(SPACINGS)}")
        if self.solver == "lcm" and self.steps > 50:
            raise ValueError(f"the LCM solver takes at most 50 steps, got {self.steps}")
        # the StyleAligned options were checked when `style` was made (see `StyleAlignedOptions`)


@dataclass
class GeneratedSet:
    """The images of a set, the reference first, with the prompts and the settings that made them."""

    images: list[Image.Image]
    prompts: list[str]
    spec: SetSpec


class SetConditioning:
    """The text conditioning of every image of a set, batched for any subset of its images.

    With SDXL, an empty negative prompt gives zero embeddings, as diffusers' SDXL pipeline does for the base model
    (`force_zeros_for_empty_prompt`) and the reference implementation's inversion does.
    """

    def __init__(self, sd: StableDiffusion, prompts: Sequence[str], negative_prompt: str, *, width: int, height: int):
        with torch.no_grad():
            encoded = {prompt: self._encode(sd, prompt, negative_prompt) for prompt in dict.fromkeys(prompts)}
        self._texts = [encoded[prompt][0] for prompt in prompts]  # (2, tokens, channels) each: [negative, prompt]
        self._pooled = [pooled for prompt in prompts if (pooled := encoded[prompt][1]) is not None]
        # [original height, original width, crop top, crop left, target height, target width]
        self._time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=sd.device, dtype=sd.dtype)

    @staticmethod
    def _encode(sd: StableDiffusion, prompt: str, negative_prompt: str) -> tuple[Tensor, Tensor | None]:
        if not isinstance(sd, StableDiffusion_XL):
            return sd.compute_clip_text_embedding(prompt, negative_text=negative_prompt), None
        text, pooled = sd.compute_clip_text_embedding(prompt, negative_text=negative_prompt)
        if not negative_prompt:
            text[0], pooled[0] = 0, 0
        return text, pooled

    def __call__(self, images: Sequence[int], classifier_free_guidance: bool = True) -> dict[str, Tensor]:
        """Keyword arguments of the model's call for a batch of images: `[uncond ... | cond ...]`, or `[cond ...]`
        without classifier-free guidance."""
        halves = (0, 1) if classifier_free_guidance else (1,)

        def guided(tensors: list[Tensor]) -> Tensor:
            return torch.cat([tensors[i][half : half + 1] for half in halves for i in images])

        kwargs = {"clip_text_embedding": guided(self._texts)}
        if self._pooled:
            kwargs["pooled_text_embedding"] = guided(self._pooled)
            kwargs["time_ids"] = self._time_ids.repeat(len(halves) * len(images), 1)
        return kwargs


def ddim(sd: StableDiffusion, steps: int) -> ExactDDIM:
    """The DDIM solver of the reference examples: scaled-linear betas from 0.00085 to 0.012, leading spacing,
    timesteps `[980, 960, ..., 0]` for 50 steps (offset 0), final cumulative alpha that of timestep 0, and the last
    step as diffusers' `DDIMScheduler` computes it (see `ExactDDIM`)."""
    solver = make_solver("ddim", steps, device=sd.device, dtype=sd.dtype)
    assert isinstance(solver, ExactDDIM)
    return solver


def lcm_guidance_embedding(sd: StableDiffusion) -> SDXLLcmAdapter | None:
    """The LCM adapter of the model's U-Net (its guidance embedding), if one is injected."""
    parent = sd.unet.parent
    while parent is not None:
        if isinstance(parent, SDXLLcmAdapter):
            return parent
        parent = parent.parent
    return None


@contextmanager
def autoencoder_in_float32(sd: StableDiffusion) -> Generator[None]:
    """Run the autoencoder in float32 when the model is in half precision (the SDXL VAE overflows in float16)."""
    if sd.lda.dtype == torch.float32:
        yield
        return
    dtype = sd.lda.dtype
    sd.lda.to(dtype=torch.float32)
    try:
        yield
    finally:
        sd.lda.to(dtype=dtype)


def initial_noise(spec: SetSpec, count: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The initial latents of a set: image `i` gets the `i`-th draw of the seeded generator."""
    assert spec.width is not None and spec.height is not None
    generator = torch.Generator().manual_seed(spec.seed)
    noise = torch.randn(count, 4, spec.height // 8, spec.width // 8, generator=generator)
    return noise.to(device=device, dtype=dtype)


def target_chunks(num_images: int, chunk_size: int | None, num_references: int = 1) -> list[list[int]]:
    """The indices of the targets (all images but the references, first), in chunks of `chunk_size` (default: one
    chunk)."""
    targets = list(range(num_references, num_images))
    size = chunk_size or max(1, len(targets))
    return [targets[start : start + size] for start in range(0, len(targets), size)]


def call_groups(
    num_images: int, chunk_size: int | None, targets: Sequence[int] | None = None, *, num_references: int = 1
) -> list[list[int]]:
    """The images of each U-Net call of a step: the references with the set's first chunk of targets, then the others.

    Args:
        num_images: The images of the set, the references first.
        chunk_size: How many targets run together (default: all).
        targets: Only the chunks that hold these targets (see `chunks_of_targets`; default: all).
        num_references: The number of references, the first images.
    """
    references = list(range(num_references))
    every_chunk = target_chunks(num_images, chunk_size, num_references)
    if not every_chunk:
        return [references]
    # the references always run with the set's first chunk, as in the whole set, so that a part of the set is
    # computed in the same batches as in the whole set and equals it exactly
    chosen = chunks_of_targets(num_images, chunk_size, targets, num_references=num_references)
    return [[*references, *every_chunk[0]], *[chunk for chunk in chosen if chunk != every_chunk[0]]]


def progress_total(
    *,
    num_images: int,
    steps: int,
    chunk_size: int | None,
    targets: Sequence[int] | None = None,
    num_references: int = 1,
) -> int:
    """The units of work of a set (or of its part: the references and `targets`): one per U-Net call, one per
    decoded image."""
    decoded = num_images if targets is None else num_references + len(targets)
    return steps * len(call_groups(num_images, chunk_size, targets, num_references=num_references)) + decoded


def predict_noise(
    sd: StableDiffusion,
    x: Tensor,
    step: int,
    *,
    solver: Solver,
    conditioning: dict[str, Tensor],
    guidance: float,
    classifier_free_guidance: bool,
) -> Tensor:
    """The guided noise prediction of a batch of latents, as `LatentDiffusionModel.forward` computes it."""
    sd.set_unet_context(timestep=solver.timesteps[step].unsqueeze(dim=0), **conditioning)
    latents = torch.cat((x, x)) if classifier_free_guidance else x
    latents = solver.scale_model_input(latents, step=step)
    if not classifier_free_guidance:
        return sd.unet(latents)
    unconditional, conditional = sd.unet(latents).chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def chunks_of_targets(
    num_images: int, chunk_size: int | None, targets: Sequence[int] | None, *, num_references: int = 1
) -> list[list[int]]:
    """The chunks (see `target_chunks`) that hold `targets` (default: all of them).

    Raises:
        ValueError: If `targets` are not whole chunks of the set: a chunk's targets run in one batch, so rendering only
            some of them would change the batch and, by a rounding, the images.
    """
    chunks = target_chunks(num_images, chunk_size, num_references)
    if targets is None:
        return chunks
    wanted = set(targets)
    chosen = [chunk for chunk in chunks if wanted.intersection(chunk)]
    if {image for chunk in chosen for image in chunk} != wanted:
        raise ValueError(f"the targets {sorted(wanted)} are not whole chunks of the set's chunks {chunks}")
    return chosen


def denoise_set(
    sd: StableDiffusion,
    adapter: StyleAlignedAdapter[Any],
    latents: Tensor,
    *,
    conditioning: SetConditioning,
    guidance: float,
    chunk_size: int | None = None,
    steps: Sequence[int] | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    before_call: Callable[[list[int]], None] | None = None,
    progress: Progress | None = None,
    solver: Solver | None = None,
    generators: Sequence[torch.Generator] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run the denoising loop of a set whose first latent is the reference.

    At every step the reference runs in the same U-Net call as the first chunk of targets, while the adapter records
    its features; the other chunks run in their own calls and use the recording. A set in one chunk makes one call per
    step, a set in k chunks k calls. The result equals running the whole set as one batch. The batch has two halves
    (unconditional, conditional) when the adapter is made with `classifier_free_guidance=True`, else one.

    Every call's images keep their own copy of the solver, so that a solver with a history (DPM-Solver++) never mixes
    the histories of different calls; a stochastic solver (LCM) draws each image's noise from its own generator.

    Args:
        sd: The model, with `adapter` injected in its U-Net.
        adapter: The StyleAligned adapter.
        latents: The initial latents, the reference first: `(images, 4, height / 8, width / 8)`.
        conditioning: The text conditioning of the images.
        guidance: The classifier-free guidance scale (unused without classifier-free guidance).
        chunk_size: How many targets run together (default: all).
        steps: The solver steps to run (default: all of the solver's).
        after_reference_step: Called with (step, reference latent) after each reference step; returns the latent
            to continue from (style transfer makes the reference follow an inversion trajectory this way).
        before_call: Called with the images of each U-Net call before it (to set per-image control inputs).
        progress: Called after each U-Net call, over the set's `progress_total` (decoding comes last).
        solver: The solver (default: the model's); it is copied, never stepped itself.
        generators: One generator per image, for a stochastic solver (default: the global generator, shared).
        targets: Only these targets are denoised, whole chunks of the set (default: all); the reference is computed
            as for the whole set, so a set split into shares of chunks gives the same latents as the whole set.

    Returns:
        The final latents (the targets not denoised are left as they were).
    """
    solver = sd.solver if solver is None else solver
    steps = list(solver.inference_steps if steps is None else steps)
    x = latents.clone()
    cache = adapter.reference_cache
    count = cache.num_references
    groups = call_groups(x.shape[0], chunk_size, targets, num_references=count)
    solvers = [fresh_copy(solver) for _ in groups]
    total = progress_total(
        num_images=x.shape[0], steps=len(steps), chunk_size=chunk_size, targets=targets, num_references=count
    )
    cfg = adapter.classifier_free_guidance

    def report(step_number: int, call: int) -> None:
        if progress:
            done = (step_number - 1) * len(groups) + call
            phase = "targets" if len(groups[0]) > 1 else "reference"
            progress(
                ProgressEvent(
                    done=done,
                    total=total,
                    phase=phase,
                    step=step_number,
                    steps=len(steps),
                    chunk=call,
                    chunks=len(groups),
                )
            )

    with torch.no_grad():
        for step_number, step in enumerate(steps, start=1):
            for call, images in enumerate(groups, start=1):
                if before_call:
                    before_call(images)
                contiguous = images == list(range(images[0], images[-1] + 1))
                rows = slice(images[0], images[-1] + 1) if contiguous else torch.tensor(images, device=x.device)
                mode = cache.record() if call == 1 else cache.replay()
                with mode if len(groups) > 1 else contextlib.nullcontext():
                    noise = predict_noise(
                        sd,
                        x[rows],
                        step,
                        solver=solvers[call - 1],
                        conditioning=conditioning(images, cfg),
                        guidance=guidance,
                        classifier_free_guidance=cfg,
                    )
                rng = None if generators is None else [generators[image] for image in images]
                x[rows] = solver_step(solvers[call - 1], x[rows], noise, step=step, generators=rng)
                if call == 1 and after_reference_step is not None:
                    x[:count] = after_reference_step(step, x[:count])
                report(step_number, call)
            cache.clear()
    return x


def denoise_with_extras(
    sd: StableDiffusion,
    spec: SetSpec,
    latents: Tensor,
    *,
    solver: Solver,
    progress: Progress | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run `denoise_set` under `solver` with the spec's extras applied and StyleAligned injected, then remove them.

    Without classifier-free guidance (a guidance scale of 1 or less, or a model with an LCM guidance embedding, which
    then gets the guidance scale), the adapter is made with `classifier_free_guidance=False` and the batch has one
    half. A stochastic solver draws each image's noise from a generator seeded by the spec's seed and the image.
    The model's adapters, weights and LCM guidance scale are as before when this returns, whether it succeeds or fails.

    Args:
        sd: The model.
        spec: The resolved set (its `style`, extras, size, guidance, seed and chunk size are used).
        latents: The initial latents, the reference first (scaled for the solver: see `initial_latents`).
        solver: The solver to denoise with (copied, not stepped itself).
        progress: See `denoise_set`.
        after_reference_step: See `denoise_set`.
        targets: See `denoise_set`.

    Returns:
        The final latents.
    """
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    conditioning = SetConditioning(sd, spec.image_prompts(), spec.negative_prompt, width=spec.width, height=spec.height)
    lcm = lcm_guidance_embedding(sd)
    cfg = spec.classifier_free_guidance and lcm is None
    adapter = StyleAlignedAdapter(
        sd.unet, spec.style, classifier_free_guidance=cfg, reference_weights=spec.mixture_weights()
    )
    generators = image_generators(spec.seed, latents.shape[0], sd.device) if is_stochastic(solver) else None
    previous_scale = None if lcm is None else lcm.condition_scale
    try:
        if lcm is not None:
            lcm.set_condition_scale(spec.guidance)
        with Composition(sd, spec.extras(), latents.shape[0], width=spec.width, height=spec.height) as composition:
            adapter.inject()
            try:
                return denoise_set(
                    sd,
                    adapter,
                    latents,
                    conditioning=conditioning,
                    guidance=spec.guidance,
                    chunk_size=spec.chunk_size,
                    after_reference_step=after_reference_step,
                    before_call=lambda images: composition.before_call(images, classifier_free_guidance=cfg),
                    progress=progress,
                    solver=solver,
                    generators=generators,
                    targets=targets,
                )
            finally:
                adapter.eject()
    finally:
        if lcm is not None and previous_scale is not None:
            lcm.set_condition_scale(previous_scale)


def initial_latents(spec: SetSpec, count: int, solver: Solver, *, sd: StableDiffusion) -> Tensor:
    """The initial noise of a set (see `initial_noise`), scaled as the solver needs it (Euler's initial sigma)."""
    return solver.scale_model_input(initial_noise(spec, count, device=sd.device, dtype=sd.dtype), step=-1)


Preview = Callable[[Tensor], None]
"""Called with the reference's latent `(1, 4, height / 8, width / 8)` after each of its denoising steps."""


def with_preview(
    after_reference_step: Callable[[int, Tensor], Tensor] | None, preview: Preview | None
) -> Callable[[int, Tensor], Tensor] | None:
    """An `after_reference_step` for `denoise_set` that also shows each new reference latent to `preview`."""
    if preview is None:
        return after_reference_step

    def step(timestep: int, latent: Tensor) -> Tensor:
        latent = after_reference_step(timestep, latent) if after_reference_step else latent
        preview(latent)
        return latent

    return step


def part_targets(num_images: int, images: Sequence[int] | None, *, num_references: int = 1) -> list[int] | None:
    """The targets of a part of a set (see `generate_set`'s `images`), or `None` for the whole set.

    Raises:
        ValueError: If `images` does not start with the references or names an image the set does not have.
    """
    if images is None:
        return None
    chosen = list(images)
    references = list(range(num_references))
    if chosen[:num_references] != references or chosen != sorted(set(chosen)) or chosen[-1] >= num_images:
        raise ValueError(f"a part of a set of {num_images} images is {references} then targets in order, got {chosen}")
    return chosen[num_references:]


def generate_set(
    sd: StableDiffusion,
    spec: SetSpec,
    progress: Progress | None = None,
    *,
    images: Sequence[int] | None = None,
    preview: Preview | None = None,
) -> GeneratedSet:
    """Generate a style-consistent set of images.

    The first image (`spec.reference_prompt`, or the first prompt) is the reference; the others share its style.
    With `spec.reference_prompts`, the first images are references and the others blend their styles.
    The spec's solver is used (by default the DDIM solver of the reference examples, see `ddim`); the model's own
    solver is neither used nor changed.

    Args:
        sd: A `StableDiffusion_XL` or `StableDiffusion_1` (see `style_aligned.weights.loading.load_pipeline`).
        spec: What to generate.
        progress: Called with (units done, units in all) as the work proceeds.
        images: Generate only these images of the set: the reference (0), then whole chunks of targets in order.
            Each equals its image in the whole set (a set can thus be made, and kept, chunk by chunk, at the cost of
            denoising the reference again for each part).
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The images (those of `images`), the reference first.

    Raises:
        ValueError: If a setting is out of range.
        RuntimeError: If the U-Net already carries StyleAligned.
    """
    resolved = spec.resolved(sd)
    targets = part_targets(len(resolved.image_prompts()), images, num_references=resolved.num_references())
    latents, spec = generate_latents(sd, resolved, progress=progress, targets=targets, preview=preview)
    return decode_set(sd, latents, spec, progress=progress, targets=targets)


def decode_set(
    sd: StableDiffusion,
    latents: Tensor,
    spec: SetSpec,
    *,
    progress: Progress | None = None,
    targets: Sequence[int] | None = None,
) -> GeneratedSet:
    """Decode the images of a denoised set (the reference and `targets`, default: all), the last units of progress."""
    prompts = spec.image_prompts()
    count = spec.num_references()
    chosen = list(range(len(prompts))) if targets is None else [*range(count), *targets]
    total = progress_total(
        num_images=len(prompts), steps=spec.steps, chunk_size=spec.chunk_size, targets=targets, num_references=count
    )
    images = decode(sd, latents[chosen], progress=progress, total=total)
    return GeneratedSet(images=images, prompts=[prompts[index] for index in chosen], spec=spec)


def generate_latents(
    sd: StableDiffusion,
    spec: SetSpec,
    *,
    progress: Progress | None = None,
    targets: Sequence[int] | None = None,
    preview: Preview | None = None,
) -> tuple[Tensor, SetSpec]:
    """Denoise a set; see `generate_set`.

    Args:
        sd: The model.
        spec: What to generate.
        progress: Called as the work proceeds.
        targets: Only these targets, whole chunks of the set (see `denoise_set`); the others keep their noise.
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The final latents (the reference first) and the resolved spec.
    """
    spec = spec.resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    solver = spec.make_solver(sd)
    latents = initial_latents(spec, len(spec.image_prompts()), solver, sd=sd)
    latents = denoise_with_extras(
        sd,
        spec,
        latents,
        solver=solver,
        progress=progress,
        targets=targets,
        after_reference_step=with_preview(None, preview),
    )
    return latents, spec


def decode(
    sd: StableDiffusion, latents: Tensor, *, progress: Progress | None = None, total: int = 0
) -> list[Image.Image]:
    """Decode latents one image at a time; decoding is the last `len(latents)` units of `total` progress."""
    images: list[Image.Image] = []
    count = latents.shape[0]
    with torch.no_grad(), autoencoder_in_float32(sd):
        for index in range(count):
            images.append(sd.lda.latents_to_image(latents[index : index + 1].to(sd.lda.dtype)))
            if progress:
                progress(
                    ProgressEvent(
                        done=total - count + index + 1,
                        total=total,
                        phase="decode",
                        step=0,
                        steps=0,
                        chunk=index + 1,
                        chunks=count,
                    )
                )
    return images
