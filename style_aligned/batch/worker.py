"""What a batch worker does: hold one pipeline, and make sets (or shares of a split set) as the commands make them.

The same `SetWorker` runs in the driver's process (no Ray) or inside a Ray actor; it returns images, never writes.
"""

import gc
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from style_aligned.batch.manifest import SetEntry
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.model import Model, kind_of
from style_aligned.pipeline.set_files import set_title, sidecar
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_set

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class Task:
    """One piece of work: a whole set, one share of a split set, or the inversion that the shares of a split
    transfer reuse.

    Attributes:
        entry: The set.
        images: The images this share decodes (`None`: the whole set); its targets are those but the reference.
        trajectory: The inversion to transfer from (made once for a split transfer).
        invert: Only invert the transfer's reference image and return the trajectory.
        attempt: The attempt (1-based).
    """

    entry: SetEntry
    images: tuple[int, ...] | None = None
    trajectory: ReferenceTrajectory | None = None
    invert: bool = False
    attempt: int = 1

    def describe(self) -> str:
        """The set and what of it this task does, for messages."""
        if self.invert:
            return f"{self.entry.id} (inversion)"
        if self.images is None:
            return self.entry.id
        share = self.entry.shares().index(self.images) + 1
        return f"{self.entry.id} (share {share}/{len(self.entry.shares())})"


@dataclass(kw_only=True)
class Rendered:
    """What a task made: images by index, with what the set's files need.

    Attributes:
        images: The images made, by their index in the set (0 is the reference).
        prompts: The prompts of every image of the set.
        details: The set's sidecar, as the command writes it.
        title: The title of the grid image.
    """

    images: dict[int, Image.Image]
    prompts: list[str]
    details: dict[str, Any]
    title: str


class SetWorker:
    """Makes the sets of a manifest on one device, loading each model once and keeping the last one loaded."""

    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        """Choose where the models run.

        Args:
            device: The torch device (default: `cuda` if available, else `cpu`).
            dtype: `float32`, `float16` or `bfloat16` (default: float32 on the CPU; on a GPU float16, bfloat16 for
                FLUX.1).
            cache_dir: For diffusers model folders, where their conversion is kept.
            threads: The number of CPU threads of torch (default: as it is). On the CPU, results depend on it in the
                last bits: workers that use the same number make the same images.
        """
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[dtype] if dtype else (torch.float32 if self.device == "cpu" else torch.float16)
        self._half = DTYPES[dtype] if dtype else None
        self.cache_dir = cache_dir
        self._model: Path | None = None
        self._sd: Model | None = None

    def where(self) -> str:
        """The device and dtype, for messages (the GPU's name on CUDA)."""
        device = self.device
        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        return f"{device}, {str(self.dtype).removeprefix('torch.')}"

    def pipeline(self, model: Path) -> Model:
        """The models of `model` (a Stable Diffusion pipeline or FLUX.1's), loaded on first use (the previous ones are
        dropped first)."""
        from style_aligned.weights.families import flux_kind, load_models

        if self._sd is None or self._model != model:
            self._sd, self._model = None, None
            gc.collect()
            dtype = self.dtype
            if self._half is None and dtype == torch.float16 and flux_kind(model) is not None:
                dtype = torch.bfloat16  # FLUX.1 is published in bfloat16
            print(f"loading {model} on {self.where()}", file=sys.stderr)
            self._sd = load_models(model, device=self.device, dtype=dtype, cache_dir=self.cache_dir)
            self._model = model
        return self._sd

    def run(self, task: Task) -> Rendered | ReferenceTrajectory:
        """Do a task: its images (or, for an inversion, the trajectory on the CPU)."""
        sd = self.pipeline(task.entry.model)
        if task.entry.kind == "transfer":
            return self._transfer(sd, task)
        return self._generate(sd, task)

    def _generate(self, sd: Model, task: Task) -> Rendered:
        entry = task.entry
        spec = entry.spec.resolved(sd)
        indices = range(spec.num_images()) if task.images is None else task.images
        made = generate_set(sd, spec, images=task.images).images
        images = dict(zip(indices, made, strict=True))
        prompts = spec.image_prompts()
        details = sidecar("generate", spec, prompts, model=str(entry.model), backbone=kind_of(sd))
        return Rendered(images=images, prompts=prompts, details=details, title=set_title("generate", spec.seed))

    def _transfer(self, sd: Model, task: Task) -> Rendered | ReferenceTrajectory:
        entry = task.entry
        trajectory = task.trajectory or (ReferenceTrajectory.load(entry.trajectory) if entry.trajectory else None)
        spec = entry.spec
        assert isinstance(spec, TransferSpec)
        if trajectory is not None and entry.steps_from_trajectory():  # as `transfer --trajectory` does
            spec = replace(spec, steps=len(trajectory.timesteps))
        if trajectory is not None and spec.width is None and spec.height is None:
            spec = replace(spec, width=trajectory.width, height=trajectory.height)
        spec = spec.resolved(sd)
        if trajectory is None:
            assert entry.image is not None and entry.caption is not None
            try:
                image = Image.open(entry.image)
                image.load()
            except (OSError, UnidentifiedImageError) as error:
                raise ValueError(f"cannot read the reference image {entry.image}: {error}") from None
            print(f"inverting {entry.image} ({spec.steps} {spec.solver} steps)", file=sys.stderr)
            trajectory = make_trajectory(sd, image, entry.caption, spec=spec)
        if task.invert:
            return replace(trajectory, latents=trajectory.latents.cpu())
        prompts = [trajectory.caption, *spec.prompts]
        details = {
            "model": str(entry.model),
            "image": str(entry.image) if entry.image else None,
            "caption": trajectory.caption,
            "trajectory": str(entry.trajectory) if entry.trajectory else None,
            "backbone": kind_of(sd),
        }
        indices = range(spec.num_images()) if task.images is None else task.images
        images = dict(zip(indices, transfer_set(sd, trajectory, spec, images=task.images).images, strict=True))
        details = sidecar("transfer", spec, prompts, **details)
        return Rendered(images=images, prompts=prompts, details=details, title=set_title("transfer", spec.seed))
