"""Style transfer from a real image: the reference row follows the image's DDIM inversion trajectory."""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor

from style_aligned.options import FLUX_KINDS, ModelKind, StyleAlignedOptions, setting
from style_aligned.pipeline.denoise import denoise_with_extras, with_preview
from style_aligned.pipeline.generate import decode_set, initial_noise
from style_aligned.pipeline.images import Fit
from style_aligned.pipeline.inversion import ReferenceTrajectory, encode_image, invert
from style_aligned.pipeline.model import Model, StableDiffusion, kind_of
from style_aligned.pipeline.progress import Preview, Progress
from style_aligned.pipeline.solvers import ddim
from style_aligned.pipeline.spec import GeneratedSet, SetSpec

TRANSFER_GUIDANCE = 10.0
"""The guidance scale of the reference implementation's transfer example."""
INVERSION_GUIDANCE = 2.0
"""The guidance scale of the inversion (transfers and panoramas from a real image)."""
OFFSET = 5
"""The trajectory index a real reference image starts from (transfers and panoramas)."""


@dataclass(kw_only=True)
class TransferSpec(SetSpec):
    """A set in the style of real images; `prompts` are the targets, the images' captions are the reference prompts.

    With several reference images, `reference_weights` weighs them (default: equal).

    Attributes:
        offset: The reference starts from the trajectory's latent at this index (5 of 50 in the reference example)
            and is held at index `offset + 1` until the schedule reaches it.
        inversion_guidance: The guidance scale of the inversion.
        fit: How the image is fitted to the size: `"crop"` (cover, centre crop) or `"resize"` (stretch).
    """

    offset: int = setting(OFFSET, help="trajectory index the reference starts from")
    inversion_guidance: float = setting(INVERSION_GUIDANCE, help="guidance of the inversion")
    fit: Fit = setting("crop", help="fit the image to the size: cover and crop, or stretch (resize)")
    style: StyleAlignedOptions = setting(
        help="how the images share the reference's style (default: the transfer example's: shared GroupNorm, shift"
        " log 2)",
        factory=StyleAlignedOptions.for_transfer,
    )

    def num_images(self) -> int:
        """The number of images of the set: the references (the images' captions) and the targets."""
        return self.num_references() + len(self.prompts)

    def resolved(self, model: "Model | ModelKind") -> "TransferSpec":
        if kind_of(model) in FLUX_KINDS:
            raise ValueError("transfer inverts the image with DDIM on an SD1 or SDXL U-Net: FLUX.1 is not supported")
        spec = replace(self, guidance=TRANSFER_GUIDANCE if self.guidance is None else self.guidance)
        resolved = SetSpec.resolved(spec, model)
        assert isinstance(resolved, TransferSpec)
        check_transfer_solver(resolved.solver, resolved.timestep_spacing)
        if not 0 <= resolved.offset < resolved.num_steps:
            raise ValueError(f"offset must be in [0, steps), got {resolved.offset} for {resolved.steps} steps")
        return resolved


def check_transfer_solver(solver: str | None, timestep_spacing: str | None) -> None:
    """Check that a transfer denoises with DDIM at leading spacing, the schedule its inversion walks.

    Raises:
        ValueError: If not.
    """
    if solver not in (None, "ddim"):
        raise ValueError(
            f"transfer denoises with DDIM, the solver its DDIM inversion is made for: got --solver {solver}"
        )
    if timestep_spacing not in (None, "leading"):
        raise ValueError(f"transfer uses DDIM's leading timesteps, as its inversion: got spacing {timestep_spacing}")


def make_trajectory(
    sd: StableDiffusion,
    image: Image.Image,
    caption: str,
    *,
    spec: TransferSpec,
    progress: Progress | None = None,
) -> ReferenceTrajectory:
    """Encode and invert a reference image for the sets of `spec` (its size, steps and fit).

    `progress` is called after each inversion step (phase `"invert"`).
    """
    spec = replace(spec, reference_prompts=None, reference_weights=None).resolved(sd)  # the image alone
    assert spec.width is not None and spec.height is not None
    latents = encode_image(sd, image, width=spec.width, height=spec.height, fit=spec.fit)
    solver = ddim(sd, spec.num_steps)
    return invert(
        sd,
        latents,
        caption,
        solver=solver,
        guidance=spec.inversion_guidance,
        width=spec.width,
        height=spec.height,
        progress=progress,
    )


Trajectories = ReferenceTrajectory | Sequence[ReferenceTrajectory]
"""One inverted reference image, or several."""


def transfer_latents(
    sd: StableDiffusion,
    trajectory: Trajectories,
    spec: TransferSpec,
    *,
    progress: Progress | None = None,
    targets: Sequence[int] | None = None,
    preview: Preview | None = None,
) -> tuple[Tensor, TransferSpec]:
    """Denoise a set in the style of inverted reference images; see `transfer_set`.

    Args:
        sd: The model.
        trajectory: The reference's inversion.
        spec: The targets and settings.
        progress: Called as the work proceeds.
        targets: Only these targets, whole chunks of the set (see `denoise_set`); the others keep their noise.
        preview: Called with the reference's latent after each of its steps.

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
    solver = ddim(sd, spec.num_steps)
    for reference_trajectory in trajectories:
        reference_trajectory.check_fits(sd, solver, width=spec.width, height=spec.height)
    prompts = spec.image_prompts()
    latents = initial_noise(spec, len(prompts), device=sd.device, dtype=sd.dtype)
    references = torch.stack([t.latents.to(device=sd.device, dtype=sd.dtype) for t in trajectories], dim=1)
    latents[: len(trajectories)] = references[spec.offset]  # references: (steps + 1, k, 4, h, w)
    first_step = solver.first_inference_step

    def follow_trajectory(step: int, _: Tensor) -> Tensor:
        return references[max(spec.offset + 1, step - first_step + 1)]

    latents = denoise_with_extras(
        sd,
        spec,
        latents,
        solver=solver,
        progress=progress,
        after_reference_step=with_preview(follow_trajectory, preview),
        targets=targets,
    )
    return latents, spec


def transfer_set(
    sd: StableDiffusion,
    trajectory: Trajectories,
    spec: TransferSpec,
    *,
    progress: Progress | None = None,
    images: Sequence[int] | None = None,
    preview: Preview | None = None,
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
        images: Generate only these images of the set (see `generate_set`).
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The images, the reference (the reconstructed input image) first.

    Raises:
        ValueError: If a setting is out of range or the trajectory does not fit the model, schedule or size.
    """
    trajectories = [trajectory] if isinstance(trajectory, ReferenceTrajectory) else list(trajectory)
    several = [f"reference {number}" for number in range(1, len(trajectories) + 1)] if len(trajectories) > 1 else None
    targets, decoded = replace(spec, reference_prompts=several).plan().select(images)
    latents, spec = transfer_latents(sd, trajectory, spec, progress=progress, targets=targets, preview=preview)
    return decode_set(sd, latents, spec, images=decoded, progress=progress)
