"""Generate a style-consistent set: its initial noise, its denoising (see `denoise`) and its decoding."""

from collections.abc import Sequence

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.pipeline.denoise import denoise_with_extras, with_preview
from style_aligned.pipeline.model import StableDiffusion, autoencoder_in_float32
from style_aligned.pipeline.progress import Preview, Progress, ProgressEvent
from style_aligned.pipeline.spec import GeneratedSet, SetSpec


def initial_noise(spec: SetSpec, count: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The initial latents of a set: image `i` gets the `i`-th draw of the seeded generator."""
    assert spec.width is not None and spec.height is not None
    generator = torch.Generator().manual_seed(spec.seed)
    noise = torch.randn(count, 4, spec.height // 8, spec.width // 8, generator=generator)
    return noise.to(device=device, dtype=dtype)


def initial_latents(spec: SetSpec, count: int, solver: Solver, *, sd: StableDiffusion) -> Tensor:
    """The initial noise of a set (see `initial_noise`), scaled as the solver needs it (Euler's initial sigma)."""
    return solver.scale_model_input(initial_noise(spec, count, device=sd.device, dtype=sd.dtype), step=-1)


def generate_set(
    sd: StableDiffusion,
    spec: SetSpec,
    *,
    progress: Progress | None = None,
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
        progress: Called with a `ProgressEvent` after each model call and each decoded image (which it carries).
        images: Generate only these images of the set: the references (or none of them), then whole chunks of targets
            in order (see `SetPlan.select`). Each equals its image in the whole set (a set can thus be made, and kept,
            chunk by chunk, at the cost of denoising the references again for each part).
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The images (those of `images`), in order.

    Raises:
        ValueError: If a setting is out of range.
        RuntimeError: If the U-Net already carries StyleAligned.
    """
    spec = spec.resolved(sd)
    targets, decoded = spec.plan().select(images)
    solver = spec.make_solver(sd)
    latents = initial_latents(spec, spec.num_images(), solver, sd=sd)
    after_reference_step = with_preview(None, preview)
    latents = denoise_with_extras(
        sd, spec, latents, solver=solver, progress=progress, targets=targets, after_reference_step=after_reference_step
    )
    return decode_set(sd, latents, spec, images=decoded, progress=progress)


def decode_set(
    sd: StableDiffusion, latents: Tensor, spec: SetSpec, *, images: Sequence[int], progress: Progress | None = None
) -> GeneratedSet:
    """Decode some images of a denoised set (see `SetPlan.select`), the last units of progress of their part."""
    prompts = spec.image_prompts()
    plan = spec.plan()
    targets = [image for image in images if image >= plan.num_references]
    total = plan.work(targets, steps=spec.steps, decoded=len(images))
    decoded = decode(sd, latents, images=images, progress=progress, total=total)
    return GeneratedSet(images=decoded, prompts=[prompts[index] for index in images], spec=spec)


def decode(
    sd: StableDiffusion,
    latents: Tensor,
    *,
    images: Sequence[int] | None = None,
    progress: Progress | None = None,
    total: int = 0,
) -> list[Image.Image]:
    """Decode latents one image at a time.

    Args:
        sd: The model.
        latents: The latents of a set.
        images: The images to decode (default: all).
        progress: Called with each decoded image, as the last `len(images)` units of `total`.
        total: The units of progress of the whole work.

    Returns:
        The images.
    """
    chosen = list(range(latents.shape[0])) if images is None else list(images)
    decoded: list[Image.Image] = []
    with torch.no_grad(), autoencoder_in_float32(sd):
        for number, index in enumerate(chosen, start=1):
            image = sd.lda.latents_to_image(latents[index : index + 1].to(sd.lda.dtype))
            decoded.append(image)
            if progress:
                done = total - len(chosen) + number
                progress(
                    ProgressEvent.decoded(
                        done=done, total=total, number=number, count=len(chosen), index=index, image=image
                    )
                )
    return decoded
