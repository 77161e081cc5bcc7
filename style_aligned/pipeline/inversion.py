"""DDIM inversion: the latent trajectory that leads a DDIM solver to a given image, kept for style transfer."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from PIL import Image
from refiners.foundationals.latent_diffusion.solvers import DDIM
from torch import Tensor

from style_aligned.options import model_kind
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.images import Fit, fit_image
from style_aligned.pipeline.model import StableDiffusion, autoencoder_in_float32
from style_aligned.pipeline.progress import Progress, ProgressEvent
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError, write_safetensors


class DDIMInversion:
    """Walk a DDIM solver's schedule upward, from an image's latent to noise.

    Uses the solver's own noise schedule and timesteps. Inversion step `i` goes from the noise level of timestep
    `t - spacing` to that of `t = timesteps[-1 - i]` (ascending): the noise is predicted at `t`, the clean latent is
    estimated from the current latent, and it is noised again to the level of `t`. Below the first timestep the level
    is that of timestep 0, as the reference implementation does (`set_alpha_to_one=False`).

    Example:
        ```py
        inversion = DDIMInversion(DDIM(num_inference_steps=50))
        for index in range(inversion.num_steps):
            noise = predict_noise(x, inversion.timestep(index))
            x = inversion.step(x, noise, index)
        ```
    """

    def __init__(self, solver: DDIM) -> None:
        """Wrap a DDIM solver.

        Args:
            solver: The generation solver (its timesteps are walked in reverse).
        """
        self.solver = solver
        self.num_steps = solver.num_inference_steps - solver.first_inference_step
        timesteps = solver.timesteps[solver.first_inference_step :]
        self._ascending = [int(t) for t in timesteps.flip(0)]
        self._spacing = solver.params.num_train_timesteps // solver.num_inference_steps

    def timestep(self, index: int) -> int:
        """The timestep at which inversion step `index` predicts the noise (ascending)."""
        return self._ascending[index]

    def step(self, x: Tensor, predicted_noise: Tensor, index: int) -> Tensor:
        """One inversion step: from the latent before step `index` to the noisier one after it."""
        timestep = self._ascending[index]
        current = max(timestep - self._spacing, 0)  # below the schedule: the level of timestep 0
        scales, stds = self.solver.cumulative_scale_factors, self.solver.noise_std
        clean = (x - stds[current] * predicted_noise) / scales[current]  # the clean latent estimated at this level
        return scales[timestep] * clean + stds[timestep] * predicted_noise


@dataclass(kw_only=True)
class ReferenceTrajectory:
    """The DDIM inversion trajectory of a reference image, reusable for many sets.

    Attributes:
        latents: `(steps + 1, 4, height / 8, width / 8)`: `latents[k]` is at the noise level of the solver's `k`-th
            timestep (the noisiest first); the last is the encoded image.
        timesteps: The solver's timesteps, descending.
        width: The image width in pixels.
        height: The image height in pixels.
        caption: The caption used for inversion; the reference's prompt when generating.
        model: The identity of the model it was made with (see `model_identity`).
        guidance: The classifier-free guidance scale of the inversion.
    """

    latents: Tensor
    timesteps: list[int]
    width: int
    height: int
    caption: str
    model: str
    guidance: float

    def save(self, path: Path | str) -> None:
        """Write the trajectory to a `.safetensors` file, with everything else as metadata."""
        latents = self.latents.detach().to(device="cpu", dtype=torch.float32).contiguous()
        metadata = {
            "format": "style-aligned reference trajectory",
            "timesteps": json.dumps(self.timesteps),
            "width": str(self.width),
            "height": str(self.height),
            "caption": self.caption,
            "model": self.model,
            "guidance": repr(self.guidance),
        }
        write_safetensors(
            Path(path), [("latents", latents.dtype, tuple(latents.shape))], lambda _: latents, metadata=metadata
        )

    @classmethod
    def load(cls, path: Path | str) -> "ReferenceTrajectory":
        """Read a trajectory written by `save`.

        Raises:
            WeightsError: If the file is not a valid trajectory.
        """
        with SafetensorsReader(path) as reader:
            metadata = reader.metadata
            if metadata.get("format") != "style-aligned reference trajectory" or "latents" not in reader.tensors:
                raise WeightsError(f"{path} is not a reference trajectory saved by style-aligned")
            latents = reader.read("latents")
        return cls(
            latents=latents,
            timesteps=json.loads(metadata["timesteps"]),
            width=int(metadata["width"]),
            height=int(metadata["height"]),
            caption=metadata["caption"],
            model=metadata["model"],
            guidance=float(metadata["guidance"]),
        )

    def check_fits(self, sd: StableDiffusion, solver: DDIM, *, width: int, height: int) -> None:
        """Check that this trajectory was made with this model, this schedule and this size.

        Raises:
            ValueError: If not, naming what differs.
        """
        problems: list[str] = []
        timesteps = [int(t) for t in solver.timesteps[solver.first_inference_step :]]
        if timesteps != self.timesteps:
            problems.append(f"it was made for {len(self.timesteps)} steps, this set has {len(timesteps)}")
        if (width, height) != (self.width, self.height):
            problems.append(f"it was made at {self.width}x{self.height} px, this set is {width}x{height} px")
        if (identity := model_identity(sd)) != self.model:
            problems.append(f"it was made with another model ({self.model}, this one is {identity})")
        if problems:
            raise ValueError(f"the reference trajectory does not fit this set: {'; '.join(problems)}")


def model_identity(sd: StableDiffusion) -> str:
    """A short identity of a model: its kind and a hash of some of its weights."""
    kind = model_kind(sd)
    digest = hashlib.sha1(kind.encode())
    for tensor in list(sd.unet.parameters())[:4] + list(sd.unet.parameters())[-4:]:
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return f"{kind}-{digest.hexdigest()[:12]}"


def encode_image(
    sd: StableDiffusion, image: Image.Image, *, width: int, height: int, fit: Fit = "crop"
) -> Float[Tensor, "1 4 latent_height latent_width"]:
    """Fit an image to the size (see `fit_image`) and encode it: the autoencoder's latent mean, scaled."""
    with torch.no_grad(), autoencoder_in_float32(sd):
        latents = sd.lda.images_to_latents([fit_image(image, width, height, fit=fit)])
    return latents.to(dtype=sd.dtype)


def invert(
    sd: StableDiffusion,
    latents: Float[Tensor, "1 4 latent_height latent_width"],
    caption: str,
    *,
    solver: DDIM,
    guidance: float = 2.0,
    width: int | None = None,
    height: int | None = None,
    progress: Progress | None = None,
) -> ReferenceTrajectory:
    """Invert an encoded image with DDIM under its caption, with classifier-free guidance.

    Args:
        sd: The model (without StyleAligned injected: the image is inverted alone).
        latents: The encoded image (see `encode_image`).
        caption: A caption of the image.
        solver: The DDIM solver the sets will be generated with.
        guidance: The classifier-free guidance scale of the noise predictions (2 in the reference example).
        width: The image width in pixels (default: from the latents).
        height: The image height in pixels (default: from the latents).
        progress: Called after each step (phase `"invert"`).

    Returns:
        The trajectory, from the noisiest latent to the encoded image.
    """
    width = width or latents.shape[-1] * 8
    height = height or latents.shape[-2] * 8
    inversion = DDIMInversion(solver)
    conditioning = SetConditioning(sd, [caption], "", width=width, height=height)([0])
    x = latents
    trajectory = [x]
    with torch.no_grad():
        for index in range(inversion.num_steps):
            timestep = torch.tensor([inversion.timestep(index)], device=sd.device)
            sd.set_unet_context(timestep=timestep, **conditioning)
            unconditional, conditional = sd.unet(torch.cat([x, x])).chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
            x = inversion.step(x, noise, index)
            trajectory.append(x)
            if progress:
                progress(ProgressEvent.inverted(step=index + 1, steps=inversion.num_steps))
    return ReferenceTrajectory(
        latents=torch.cat(trajectory[::-1]),
        timesteps=[int(t) for t in solver.timesteps[solver.first_inference_step :]],
        width=width,
        height=height,
        caption=caption,
        model=model_identity(sd),
        guidance=guidance,
    )
