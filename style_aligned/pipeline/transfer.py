"""Style transfer from a real image: the reference row follows the image's inversion trajectory (DDIM's on the
U-Nets, the flow's on FLUX.1)."""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor

from style_aligned.options import FLUX_KINDS, ModelKind, StyleAlignedOptions, setting
from style_aligned.pipeline.backbone import backbone_of
from style_aligned.pipeline.denoise import denoise_with_extras, with_preview
from style_aligned.pipeline.generate import decode_set, unpacked_preview
from style_aligned.pipeline.images import Fit
from style_aligned.pipeline.inversion import ReferenceTrajectory, encode_image, invert
from style_aligned.pipeline.model import Model, kind_of
from style_aligned.pipeline.progress import Preview, Progress
from style_aligned.pipeline.spec import GeneratedSet, SetSpec

TRANSFER_GUIDANCE: dict[ModelKind, float | None] = {"sd1": 10.0, "sdxl": 10.0, "flux_dev": 3.5, "flux_schnell": None}
"""The guidance scale of a transfer: the reference implementation's transfer example (U-Nets); FLUX.1's own."""
INVERSION_GUIDANCE: dict[ModelKind, float | None] = {"sd1": 2.0, "sdxl": 2.0, "flux_dev": 1.0, "flux_schnell": None}
"""The guidance scale of the inversion (transfers and panoramas from a real image): the reference example's
classifier-free guidance on the U-Nets; FLUX.1 [dev]'s guidance embedding at 1, as flow inversions run it; none on
[schnell]."""
OFFSET: dict[ModelKind, int] = {"sd1": 5, "sdxl": 5, "flux_dev": 3, "flux_schnell": 1}
"""The trajectory index a real reference image starts from (transfers and panoramas): 5 of the U-Nets' 50 steps as
in the reference example, about a tenth of FLUX.1 [dev]'s 28, 1 of [schnell]'s 4."""


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

    offset: int | None = setting(
        None, help="trajectory index the reference starts from (default: 5 SD1 and SDXL, 3 FLUX.1 [dev], 1 [schnell])"
    )
    inversion_guidance: float | None = setting(
        None, help="guidance of the inversion (default: 2 SD1 and SDXL, 1 FLUX.1 [dev]; [schnell] takes none)"
    )
    fit: Fit = setting("crop", help="fit the image to the size: cover and crop, or stretch (resize)")
    style: StyleAlignedOptions = setting(
        help="how the images share the reference's style (default on SD1 and SDXL: the transfer example's: shared"
        " GroupNorm, shift log 2; FLUX.1 shares as in its sets)",
        factory=StyleAlignedOptions.for_transfer,
    )

    def num_images(self) -> int:
        """The number of images of the set: the references (the images' captions) and the targets."""
        return self.num_references() + len(self.prompts)

    def offset_for(self, kind: ModelKind) -> int:
        """The offset given, or the model kind's default (see `OFFSET`)."""
        return OFFSET[kind] if self.offset is None else self.offset

    def resolved(self, model: "Model | ModelKind") -> "TransferSpec":
        kind = kind_of(model)
        if kind == "flux_schnell" and self.inversion_guidance is not None:
            raise ValueError("FLUX.1 [schnell] has no guidance embedding: it takes no inversion guidance")
        spec = replace(
            self,
            style=_without_unet_example(self.style) if kind in FLUX_KINDS else self.style,
            guidance=TRANSFER_GUIDANCE[kind] if self.guidance is None else self.guidance,
            offset=self.offset_for(kind),
            inversion_guidance=INVERSION_GUIDANCE[kind] if self.inversion_guidance is None else self.inversion_guidance,
        )
        resolved = SetSpec.resolved(spec, model)
        assert isinstance(resolved, TransferSpec) and resolved.offset is not None
        check_transfer_solver(resolved.solver, resolved.timestep_spacing)
        if not 0 <= resolved.offset < resolved.num_steps:
            raise ValueError(f"offset must be in [0, steps), got {resolved.offset} for {resolved.steps} steps")
        return resolved


def _without_unet_example(style: StyleAlignedOptions) -> StyleAlignedOptions:
    """The style of a FLUX.1 transfer: the options left at the U-Net transfer example's values (shared GroupNorm,
    shift log 2) back at the plain defaults, so that FLUX.1 shares as its sets do (AlignedGen's way)."""
    example, plain = StyleAlignedOptions.for_transfer(), StyleAlignedOptions()
    names = [
        name for name in ("share_group_norm", "shared_score_shift") if getattr(style, name) == getattr(example, name)
    ]
    return style.replace(**{name: getattr(plain, name) for name in names})


def check_transfer_solver(solver: str | None, timestep_spacing: str | None) -> None:
    """Check that a transfer denoises with the schedule its inversion walks: DDIM at leading spacing (U-Nets) or
    FLUX.1's flow_euler.

    Raises:
        ValueError: If not.
    """
    if solver not in (None, "ddim", "flow_euler"):
        raise ValueError(
            "transfer denoises with the solver its inversion is made for (ddim on SD1 and SDXL, flow_euler on"
            f" FLUX.1): got --solver {solver}"
        )
    if timestep_spacing not in (None, "leading"):
        raise ValueError(f"transfer uses DDIM's leading timesteps, as its inversion: got spacing {timestep_spacing}")


def make_trajectory(
    model: Model,
    image: Image.Image,
    caption: str,
    *,
    spec: TransferSpec,
    progress: Progress | None = None,
) -> ReferenceTrajectory:
    """Encode and invert a reference image for the sets of `spec` (its size, steps and fit) on a model (a U-Net
    pipeline or FLUX.1's models).

    `progress` is called after each inversion step (phase `"invert"`).
    """
    backbone = backbone_of(model)
    spec = replace(spec, reference_prompts=None, reference_weights=None).resolved(backbone.kind)  # the image alone
    assert spec.width is not None and spec.height is not None
    latents = encode_image(backbone, image, width=spec.width, height=spec.height, fit=spec.fit)
    return invert(
        backbone,
        latents,
        caption,
        solver=backbone.make_solver(spec),
        guidance=spec.inversion_guidance,
        width=spec.width,
        height=spec.height,
        progress=progress,
    )


Trajectories = ReferenceTrajectory | Sequence[ReferenceTrajectory]
"""One inverted reference image, or several."""


def transfer_latents(
    model: Model,
    trajectory: Trajectories,
    spec: TransferSpec,
    *,
    progress: Progress | None = None,
    targets: Sequence[int] | None = None,
    preview: Preview | None = None,
) -> tuple[Tensor, TransferSpec]:
    """Denoise a set in the style of inverted reference images; see `transfer_set`.

    Args:
        model: The model (a U-Net pipeline or FLUX.1's models).
        trajectory: The reference's inversion.
        spec: The targets and settings.
        progress: Called as the work proceeds.
        targets: Only these targets, whole chunks of the set (see `denoise_set`); the others keep their noise.
        preview: Called with the reference's latent after each of its steps.

    Returns:
        The final latents (the references first) and the resolved spec.
    """
    backbone = backbone_of(model)
    trajectories = [trajectory] if isinstance(trajectory, ReferenceTrajectory) else list(trajectory)
    if not trajectories:
        raise ValueError("style transfer needs at least one reference image")
    captions = [reference.caption for reference in trajectories]
    several = len(trajectories) > 1
    spec = replace(
        spec,
        reference_prompt=None if several else captions[0],
        reference_prompts=captions if several else None,
    ).resolved(backbone.kind)
    assert spec.width is not None and spec.height is not None and spec.offset is not None
    solver = backbone.make_solver(spec)
    for reference_trajectory in trajectories:
        reference_trajectory.check_fits(backbone, solver, width=spec.width, height=spec.height)
    latents = backbone.initial_latents(spec, spec.num_images(), solver)
    device, dtype = backbone.device, backbone.dtype
    references = torch.stack([t.latents.to(device=device, dtype=dtype) for t in trajectories], dim=1)
    offset, first_step = spec.offset, solver.first_inference_step
    latents[: len(trajectories)] = references[offset]  # references: (steps + 1, k, *latent)

    def follow_trajectory(step: int, _: Tensor) -> Tensor:
        return references[max(offset + 1, step - first_step + 1)]

    latents = denoise_with_extras(
        backbone,
        spec,
        latents,
        solver=solver,
        progress=progress,
        after_reference_step=with_preview(follow_trajectory, unpacked_preview(preview, backbone, spec)),
        targets=targets,
    )
    return latents, spec


def transfer_set(
    model: Model,
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
        model: The model (a U-Net pipeline or FLUX.1's models).
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
    latents, spec = transfer_latents(model, trajectory, spec, progress=progress, targets=targets, preview=preview)
    return decode_set(model, latents, spec, images=decoded, progress=progress)
