"""What a transfer is asked for, whichever front end asks: its values (see `read_spec`), its reference images with
their captions or saved inversions, and what its sidecar records of them."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.set_files import set_request
from style_aligned.pipeline.spec_fields import read_spec
from style_aligned.pipeline.transfer import TransferSpec, check_transfer_solver


@dataclass(frozen=True, kw_only=True)
class TransferReferences:
    """The references of a transfer as given: images with their captions, or saved inversions.

    Attributes:
        images: The reference images.
        captions: One caption per image (its prompt in the set).
        trajectories: Saved inversions to reuse instead of images.
        save_trajectories: Where to save the inversion of each image.
    """

    images: list[Path] = field(default_factory=lambda: [])
    captions: list[str] = field(default_factory=lambda: [])
    trajectories: list[Path] = field(default_factory=lambda: [])
    save_trajectories: list[Path] = field(default_factory=lambda: [])

    def count(self, weights: list[float] | None = None) -> int:
        """The number of references (images with captions, or saved inversions).

        Raises:
            ValueError: If the references are not given in one way, or they and `weights` do not pair up.
        """
        images, saved = self.images, self.trajectories
        if not saved and (not images or len(images) != len(self.captions)):
            raise ValueError(
                "give the reference as --image and --caption, or reuse an inversion with --trajectory (one --caption"
                f" per --image; got {len(images)} images and {len(self.captions)} captions)"
            )
        if saved and images:
            raise ValueError("give the references as --image/--caption pairs or as --trajectory files, not both")
        if self.save_trajectories and len(self.save_trajectories) != len(images):
            raise ValueError(
                f"give one --save-trajectory per --image: {len(self.save_trajectories)} for {len(images)} images"
            )
        count = len(saved) or len(images)
        if weights is not None and len(weights) != count:
            raise ValueError(f"give one --reference-weight per reference: {len(weights)} for {count} references")
        return count

    def details(self, model: str, trajectories: list[ReferenceTrajectory]) -> dict[str, Any]:
        """What a transfer set's sidecar adds to its settings: the model, the images, their captions and
        inversions."""
        files = self.trajectories or self.save_trajectories
        details: dict[str, Any] = {"model": model}
        if len(trajectories) == 1:
            return details | {
                "image": str(self.images[0]) if self.images else None,
                "caption": trajectories[0].caption,
                "trajectory": str(files[0]) if files else None,
            }
        return details | {
            "image": None,
            "caption": None,
            "trajectory": None,
            "reference_images": [str(path) for path in self.images] or None,
            "reference_trajectories": [str(path) for path in files] or None,
        }

    def request(self, model: str, spec: TransferSpec) -> dict[str, Any]:
        """What a transfer set is asked for: the spec as given, the model and the references as given."""
        references = {
            "images": [str(path) for path in self.images],
            "captions": list(self.captions),
            "trajectories": [str(path) for path in self.trajectories],
        }
        return set_request("transfer", spec, model=model, **references)


def transfer_spec(
    values: Mapping[str, Any], references: TransferReferences, first: ReferenceTrajectory | None = None
) -> TransferSpec:
    """The transfer asked for by `values` (see `read_spec`; the references' prompts come from the references); size
    and steps not given are those of a reused inversion `first`.

    Everything that can be checked without the model is checked.

    Raises:
        ValueError: If a value is out of range, or the solver is not the inversion's.
    """
    count = references.count(values.get("reference_weights"))
    values = dict(values)
    if first is not None:
        if "width" not in values and "height" not in values:
            values |= {"width": first.width, "height": first.height}
        values.setdefault("steps", len(first.timesteps))
    if count > 1:
        values["reference_prompts"] = [f"reference {i + 1}" for i in range(count)]
    spec = read_spec(TransferSpec, values, leave_out=("reference_prompt",))
    check_transfer_solver(spec.solver, spec.timestep_spacing)
    spec.check()
    return spec
