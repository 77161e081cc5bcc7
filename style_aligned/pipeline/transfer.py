"""Style transfer from a real image: the reference row follows the image's DDIM inversion trajectory."""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from torch import Tensor

from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.generate import (
    GeneratedSet,
    Progress,
    SetConditioning,
    SetSpec,
    StableDiffusion,
    ddim,
    decode,
    denoise_with_extras,
    initial_noise,
    progress_total,
)
from style_aligned.pipeline.images import Fit
from style_aligned.pipeline.inversion import ReferenceTrajectory, encode_image, invert

TRANSFER_GUIDANCE = 10.0
INVERSION_GUIDANCE = 2.0
OFFSET = 5


@dataclass
class TransferSpec(SetSpec):
    """A set in the style of real images; `prompts` are the targets, the images' captions are the reference prompts.

    With several reference images, `reference_weights` weighs them (default: equal).

    Attributes:
        offset: The reference starts from the trajectory's latent at this index (5 of 50 in the reference example)
            and is held at index `offset + 1` until the schedule reaches it.
        inversion_guidance: The guidance scale of the inversion.
        fit: How the image is fitted to the size: `"crop"` (cover, centre crop) or `"resize"` (stretch).
    """

    offset: int = OFFSET
    inversion_guidance: float = INVERSION_GUIDANCE
    fit: Fit = "crop"
    style: StyleAlignedOptions = field(default_factory=StyleAlignedOptions.for_transfer)

    def resolved(self, sd: StableDiffusion) -> "TransferSpec":
        spec = replace(self, guidance=TRANSFER_GUIDANCE if self.guidance is None else self.guidance)
        resolved = SetSpec.resolved(spec, sd)
        assert isinstance(resolved, TransferSpec)
        if not 0 <= resolved.offset < resolved.steps:
            raise ValueError(f"offset must be in [0, steps), got {resolved.offset} for {resolved.steps} steps")
        return resolved


def make_trajectory(sd: StableDiffusion, image: Image.Image, caption: str, spec: TransferSpec) -> ReferenceTrajectory:
    """Encode and invert a reference image for the sets of `spec` (its size, steps and fit)."""
    spec = replace(spec, reference_prompts=None, reference_weights=None).resolved(sd)  # the image alone
    assert spec.width is not None and spec.height is not None
    latents = encode_image(sd, image, spec.width, spec.height, spec.fit)
    return invert(sd, latents, caption, ddim(sd, spec.steps), spec.inversion_guidance, spec.width, spec.height)


Trajectories = ReferenceTrajectory | Sequence[ReferenceTrajectory]
"""One inverted reference image, or several."""


def transfer_latents(
    sd: StableDiffusion,
    trajectory: Trajectories,
    spec: TransferSpec,
    progress: Progress | None = None,
) -> tuple[Tensor, TransferSpec]:
    """Denoise a set in the style of inverted reference images; see `transfer_set`.

    Returns:
        The final latents (the references first) and the resolved spec.
    """
    trajectories = [trajectory] if isinstance(trajectory, ReferenceTrajectory) else list(trajectory)
    if not trajectories:
        raise ValueError("style transfer needs at least one reference image")
    captions = [reference.caption for reference in trajectories]
    several = len(trajectories) > 1
    spec = replace(
        spec,
        reference_prompt=None if several else captions[0],
        reference_prompts=captions if several else None,
    ).resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    solver = ddim(sd, spec.steps)
    for reference_trajectory in trajectories:
        reference_trajectory.check_fits(sd, solver, spec.width, spec.height)
    prompts = spec.image_prompts()
    conditioning = SetConditioning(sd, prompts, spec.negative_prompt, spec.width, spec.height)
    latents = initial_noise(spec, len(prompts), sd.device, sd.dtype)
    references = torch.stack([t.latents.to(device=sd.device, dtype=sd.dtype) for t in trajectories], dim=1)
    latents[: len(trajectories)] = references[spec.offset]  # references: (steps + 1, k, 4, h, w)
    first_step = solver.first_inference_step

    def follow_trajectory(step: int, _: Tensor) -> Tensor:
        return references[max(spec.offset + 1, step - first_step + 1)]

    latents = denoise_with_extras(
        sd, spec, latents, conditioning, solver=solver, progress=progress, after_reference_step=follow_trajectory
    )
    return latents, spec


def transfer_set(
    sd: StableDiffusion,
    trajectory: Trajectories,
    spec: TransferSpec,
    progress: Progress | None = None,
) -> GeneratedSet:
    """Generate a set in the style of an inverted reference image.

    Image 0 is the reference: it starts from the trajectory's latent at `spec.offset` and, after every denoising step
    `i`, its latent becomes the trajectory's latent at `max(offset + 1, i + 1)`, so that its final latent is the
    encoded image. The targets share its attention as in `generate_set`. With several trajectories, the first images
    are the references, each following its own trajectory, and the targets blend their styles
    (`spec.reference_weights`).

    Args:
        sd: The model.
        trajectory: The reference's inversion (see `make_trajectory`), for this model, schedule and size, or several.
        spec: The targets and settings; its reference prompts are ignored (the trajectories' captions are used).
        progress: Called as the work proceeds.

    Returns:
        The images, the reference (the reconstructed input image) first.

    Raises:
        ValueError: If a setting is out of range or the trajectory does not fit the model, schedule or size.
    """
    latents, spec = transfer_latents(sd, trajectory, spec, progress)
    prompts = spec.image_prompts()
    total = progress_total(spec.steps, len(prompts), spec.chunk_size, spec.num_references())
    return GeneratedSet(images=decode(sd, latents, progress=progress, total=total), prompts=prompts, spec=spec)
