"""Generate a style-consistent set: the reference once per step, the targets in chunks, at constant memory."""

from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.solvers import DDIM, SolverParams
from torch import Tensor

from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.layers.reference_cache import mixture_weights
from style_aligned.options import ModelKind, StyleAlignedOptions, model_kind
from style_aligned.pipeline.composition import Composition, ControlSpec, Extras, IPAdapterSpec, LoraSpec

StableDiffusion = StableDiffusion_XL | StableDiffusion_1
DEFAULT_SIZE: dict[ModelKind, int] = {"sdxl": 1024, "sd1": 512}
"""The image size of the reference examples, in pixels (square)."""
DEFAULT_GUIDANCE: dict[ModelKind, float] = {"sdxl": 5.0, "sd1": 7.5}
"""The classifier-free guidance scale of the reference examples."""


@dataclass(frozen=True)
class ProgressEvent:
    """Where a generation stands: one unit of work per U-Net call and per decoded image.

    Attributes:
        done: Units done.
        total: Units in all.
        phase: `"reference"` or `"targets"` (U-Net calls), or `"decode"`.
        step: The denoising step (1-based; steps done when decoding).
        steps: The number of denoising steps.
        chunk: The chunk of targets (1-based; 0 for the reference), or the image decoded.
        chunks: The number of chunks of targets, or of images when decoding.
    """

    done: int
    total: int
    phase: str
    step: int
    steps: int
    chunk: int
    chunks: int


Progress = Callable[[ProgressEvent], None]


@dataclass
class SetSpec:
    """A style-consistent set to generate.

    Attributes:
        prompts: One prompt per image. Without `reference_prompt` or `reference_prompts`, the first is the reference.
        reference_prompt: The prompt of an extra reference image placed before the others.
        reference_prompts: The prompts of several reference images placed before the others, whose styles the
            targets blend (instead of `reference_prompt`).
        reference_weights: One relative weight per reference (default: equal); see `ReferenceCache.mixture_weights`.
        negative_prompt: The negative prompt of every image.
        seed: The seed of the initial noise (image `i` gets the `i`-th draw, whatever the chunk size).
        steps: The number of DDIM steps (the solver of the reference examples, see `ddim`).
        guidance: The classifier-free guidance scale (default: 5 for SDXL, 7.5 for SD1, as in the reference examples).
        width: The image width in pixels, a multiple of 8 (default: 1024 for SDXL, 512 for SD1).
        height: The image height in pixels, a multiple of 8 (default: as `width`).
        chunk_size: How many targets run together (default: all); memory does not grow with the set beyond it.
        style: How the images share the reference's style; options left to the model kind take its defaults.
        controls: ControlNets guiding the targets, each with one control image for all targets or one per target.
        loras: LoRAs applied while the set is generated.
        ip_adapter: An IP-Adapter image prompt for every image.
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

    def resolved(self, sd: StableDiffusion) -> "SetSpec":
        """This spec with the model's defaults filled in, checked.

        Raises:
            ValueError: If a setting is out of range.
        """
        kind = model_kind(sd)
        width = self.width or self.height or DEFAULT_SIZE[kind]
        height = self.height or width
        guidance = DEFAULT_GUIDANCE[kind] if self.guidance is None else self.guidance
        spec = replace(self, width=width, height=height, guidance=guidance, style=self.style.resolved(kind))
        if not spec.image_prompts():
            raise ValueError("a set needs at least one prompt")
        if spec.reference_prompts is not None:
            if spec.reference_prompt is not None:
                raise ValueError("give the reference as reference_prompt or reference_prompts, not both")
            if not spec.reference_prompts:
                raise ValueError("reference_prompts needs at least one prompt")
            if len(spec.reference_prompts) > 1 and spec.controls:
                raise ValueError("ControlNets work with one reference; give a single reference prompt")
        spec.mixture_weights()
        if width % 8 or height % 8 or width < 8 or height < 8:
            raise ValueError(f"the image size must be multiples of 8 pixels, got {width}x{height}")
        if spec.steps < 1:
            raise ValueError(f"steps must be at least 1, got {spec.steps}")
        if spec.chunk_size is not None and spec.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {spec.chunk_size}")
        return spec


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

    def __init__(self, sd: StableDiffusion, prompts: Sequence[str], negative_prompt: str, width: int, height: int):
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

    def __call__(self, images: Sequence[int]) -> dict[str, Tensor]:
        """Keyword arguments of the model's call for a batch of images: `[uncond ... | cond ...]`."""

        def guided(tensors: list[Tensor]) -> Tensor:
            return torch.cat([tensors[i][half : half + 1] for half in (0, 1) for i in images])

        kwargs = {"clip_text_embedding": guided(self._texts)}
        if self._pooled:
            kwargs["pooled_text_embedding"] = guided(self._pooled)
            kwargs["time_ids"] = self._time_ids.repeat(2 * len(images), 1)
        return kwargs


def ddim(sd: StableDiffusion, steps: int) -> DDIM:
    """The DDIM solver of the reference examples: scaled-linear betas from 0.00085 to 0.012, leading spacing,
    timesteps `[980, 960, ..., 0]` for 50 steps (offset 0), final cumulative alpha that of timestep 0."""
    return DDIM(num_inference_steps=steps, params=SolverParams(timesteps_offset=0), device=sd.device, dtype=sd.dtype)


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


def initial_noise(spec: SetSpec, count: int, device: torch.device, dtype: torch.dtype) -> Tensor:
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


def progress_total(num_steps: int, num_images: int, chunk_size: int | None, num_references: int = 1) -> int:
    """The units of work of a set, for progress: one per U-Net call of the denoising loop, one per decoded image."""
    return num_steps * (1 + len(target_chunks(num_images, chunk_size, num_references))) + num_images


def denoise_set(
    sd: StableDiffusion,
    adapter: StyleAlignedAdapter[Any],
    latents: Tensor,
    conditioning: SetConditioning,
    *,
    guidance: float,
    chunk_size: int | None = None,
    steps: Sequence[int] | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    before_call: Callable[[list[int]], None] | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Run the denoising loop of a set whose first latents are the references (one, or the adapter's several).

    At every step the references run alone while the adapter records their features, then the targets run in chunks
    that use the recording. The result equals running the whole set as one batch.

    Args:
        sd: The model, with `adapter` injected in its U-Net.
        adapter: The StyleAligned adapter.
        latents: The initial latents, the reference first: `(images, 4, height / 8, width / 8)`.
        conditioning: The text conditioning of the images.
        guidance: The classifier-free guidance scale.
        chunk_size: How many targets run together (default: all).
        steps: The solver steps to run (default: all of `sd.steps`).
        after_reference_step: Called with (step, reference latents) after each reference step; returns the latents
            to continue from (style transfer makes the reference follow an inversion trajectory this way).
        before_call: Called with the images of each U-Net call before it (to set per-image control inputs).
        progress: Called after each U-Net call, over the set's `progress_total` (decoding comes last).

    Returns:
        The final latents.
    """
    steps = list(sd.steps if steps is None else steps)
    x = latents.clone()
    cache = adapter.reference_cache
    count = cache.num_references
    references = list(range(count))
    chunks = target_chunks(x.shape[0], chunk_size, count)
    total = progress_total(len(steps), x.shape[0], chunk_size, count)

    def report(phase: str, step_number: int, chunk: int) -> None:
        if progress:
            done = (step_number - 1) * (1 + len(chunks)) + chunk + 1
            progress(ProgressEvent(done, total, phase, step_number, len(steps), chunk, len(chunks)))

    with torch.no_grad():
        for step_number, step in enumerate(steps, start=1):
            if before_call:
                before_call(references)
            with cache.record():
                x[:count] = sd(x[:count], step, **conditioning(references), condition_scale=guidance)
            if after_reference_step is not None:
                x[:count] = after_reference_step(step, x[:count])
            report("reference", step_number, 0)
            with cache.replay():
                for number, chunk in enumerate(chunks, start=1):
                    if before_call:
                        before_call(chunk)
                    images = slice(chunk[0], chunk[-1] + 1)
                    x[images] = sd(x[images], step, **conditioning(chunk), condition_scale=guidance)
                    report("targets", step_number, number)
            cache.clear()
    return x


def denoise_with_extras(
    sd: StableDiffusion,
    spec: SetSpec,
    latents: Tensor,
    conditioning: SetConditioning,
    *,
    solver: DDIM,
    progress: Progress | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Run `denoise_set` under `solver` with the spec's extras applied and StyleAligned injected, then remove them.

    The model's solver, adapters and weights are as before when this returns, whether it succeeds or fails.

    Args:
        sd: The model.
        spec: The resolved set (its `style`, extras, size, guidance and chunk size are used).
        latents: The initial latents, the reference first.
        conditioning: The text conditioning of the images.
        solver: The solver to denoise with.
        progress: See `denoise_set`.
        after_reference_step: See `denoise_set`.

    Returns:
        The final latents.
    """
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    adapter = StyleAlignedAdapter(sd.unet, spec.style, reference_weights=spec.mixture_weights())
    previous_solver, sd.solver = sd.solver, solver
    try:
        with Composition(sd, spec.extras(), latents.shape[0], spec.width, spec.height) as composition:
            adapter.inject()
            try:
                return denoise_set(
                    sd,
                    adapter,
                    latents,
                    conditioning,
                    guidance=spec.guidance,
                    chunk_size=spec.chunk_size,
                    after_reference_step=after_reference_step,
                    before_call=composition.before_call,
                    progress=progress,
                )
            finally:
                adapter.eject()
    finally:
        sd.solver = previous_solver


def generate_set(sd: StableDiffusion, spec: SetSpec, progress: Progress | None = None) -> GeneratedSet:
    """Generate a style-consistent set of images.

    The first image (`spec.reference_prompt`, or the first prompt) is the reference; the others share its style.
    With `spec.reference_prompts`, the first images are references and the others blend their styles.
    The DDIM solver of the reference examples is used (see `ddim`); the model's solver is restored afterwards.

    Args:
        sd: A `StableDiffusion_XL` or `StableDiffusion_1` (see `style_aligned.weights.loading.load_pipeline`).
        spec: What to generate.
        progress: Called with (units done, units in all) as the work proceeds.

    Returns:
        The images, the reference first.

    Raises:
        ValueError: If a setting is out of range.
        RuntimeError: If the U-Net already carries StyleAligned.
    """
    spec = spec.resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    prompts = spec.image_prompts()
    conditioning = SetConditioning(sd, prompts, spec.negative_prompt, spec.width, spec.height)
    latents = initial_noise(spec, len(prompts), sd.device, sd.dtype)
    latents = denoise_with_extras(sd, spec, latents, conditioning, solver=ddim(sd, spec.steps), progress=progress)
    total = progress_total(spec.steps, len(prompts), spec.chunk_size, spec.num_references())
    return GeneratedSet(images=decode(sd, latents, progress=progress, total=total), prompts=prompts, spec=spec)


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
                progress(ProgressEvent(total - count + index + 1, total, "decode", 0, 0, index + 1, count))
    return images
