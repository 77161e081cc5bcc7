"""Generate a style-consistent set: its initial noise, its denoising (see `denoise`) and its decoding, on any backbone
(see `backbone`)."""

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from style_aligned.pipeline.backbone import Backbone, backbone_of
from style_aligned.pipeline.denoise import denoise_with_extras, with_preview
from style_aligned.pipeline.model import Model
from style_aligned.pipeline.progress import Preview, Progress, ProgressEvent
from style_aligned.pipeline.spec import GeneratedSet, SetSpec
from style_aligned.pipeline.unet_backbone import initial_noise

__all__ = ["decode", "decode_set", "generate_set", "initial_noise", "unpacked_preview"]


def generate_set(
    model: Model,
    spec: SetSpec,
    *,
    progress: Progress | None = None,
    images: Sequence[int] | None = None,
    preview: Preview | None = None,
) -> GeneratedSet:
    """Generate a style-consistent set of images.

    The first image (`spec.reference_prompt`, or the first prompt) is the reference; the others share its style.
    With `spec.reference_prompts`, the first images are references and the others blend their styles.
    The spec's solver is used (by default the DDIM solver of the reference examples, see `ddim`, or FLUX.1's
    flow-matching Euler solver); the model's own solver is neither used nor changed.

    Args:
        model: A `StableDiffusion_XL` or `StableDiffusion_1`, or FLUX.1's `FluxModels` (see
            `style_aligned.weights.loading.load_pipeline`); with `FluxModels.offload`, each stage has the accelerator
            alone.
        spec: What to generate.
        progress: Called with a `ProgressEvent` after each model call and each decoded image (which it carries).
        images: Generate only these images of the set: the references (or none of them), then whole chunks of targets
            in order (see `SetPlan.select`). Each equals its image in the whole set (a set can thus be made, and kept,
            chunk by chunk, at the cost of denoising the references again for each part).
        preview: Called with the reference's latent `(1, channels, height / 8, width / 8)` after each of its steps.

    Returns:
        The images (those of `images`), in order.

    Raises:
        ValueError: If a setting is out of range or does not apply to the model (see `SetSpec.refusals`).
        RuntimeError: If the model already carries StyleAligned.
    """
    backbone = backbone_of(model)
    spec = spec.resolved(backbone.kind)
    targets, decoded = spec.plan().select(images)
    solver = backbone.make_solver(spec)
    latents = backbone.initial_latents(spec, spec.num_images(), solver)
    shown = unpacked_preview(preview, backbone, spec)
    latents = denoise_with_extras(
        backbone,
        spec,
        latents,
        solver=solver,
        progress=progress,
        targets=targets,
        after_reference_step=with_preview(None, shown),
    )
    return decode_set(backbone, latents, spec, images=decoded, progress=progress)


def unpacked_preview(preview: Preview | None, backbone: Backbone, spec: SetSpec) -> Preview | None:
    """A preview that shows latents as the autoencoder takes them (FLUX.1's packed tokens unpacked)."""
    if preview is None:
        return None

    def show(latent: Tensor) -> None:
        preview(backbone.unpacked(latent, spec))

    return show


def decode_set(
    model: Model | Backbone,
    latents: Tensor,
    spec: SetSpec,
    *,
    images: Sequence[int],
    progress: Progress | None = None,
) -> GeneratedSet:
    """Decode some images of a denoised set (see `SetPlan.select`), the last units of progress of their part."""
    prompts = spec.image_prompts()
    plan = spec.plan()
    targets = [image for image in images if image >= plan.num_references]
    assert spec.steps is not None
    total = plan.work(targets, steps=spec.steps, decoded=len(images))
    decoded = decode(model, latents, spec, images=images, progress=progress, total=total)
    return GeneratedSet(images=decoded, prompts=[prompts[index] for index in images], spec=spec)


def decode(
    model: Model | Backbone,
    latents: Tensor,
    spec: SetSpec,
    *,
    images: Sequence[int] | None = None,
    progress: Progress | None = None,
    total: int = 0,
) -> list[Image.Image]:
    """Decode latents one image at a time (in the autoencoder's stage).

    Args:
        model: The model (or its backbone).
        latents: The latents of a set.
        spec: The resolved set (its size).
        images: The images to decode (default: all).
        progress: Called with each decoded image, as the last `len(images)` units of `total`.
        total: The units of progress of the whole work.

    Returns:
        The images.
    """
    backbone = backbone_of(model)
    chosen = list(range(latents.shape[0])) if images is None else list(images)
    decoded: list[Image.Image] = []
    with torch.no_grad(), backbone.stage("decode"):
        for number, index in enumerate(chosen, start=1):
            image = backbone.decode(latents[index : index + 1], spec)
            decoded.append(image)
            if progress:
                done = total - len(chosen) + number
                progress(
                    ProgressEvent.decoded(
                        done=done, total=total, number=number, count=len(chosen), index=index, image=image
                    )
                )
    return decoded
