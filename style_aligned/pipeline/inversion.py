"""Inversion: the latent trajectory that leads a solver to a given image, kept for style transfer. DDIM's for the
U-Nets, the flow's Euler steps run backwards for FLUX.1."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion.solvers import DDIM, Solver
from torch import Tensor

from style_aligned.flux.solver import FlowMatchEuler
from style_aligned.options import FLUX_KINDS
from style_aligned.pipeline.backbone import Backbone, backbone_of
from style_aligned.pipeline.images import Fit, fit_image
from style_aligned.pipeline.model import Model
from style_aligned.pipeline.progress import Progress, ProgressEvent
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError, write_safetensors


class Inversion:
    """A solver's schedule walked upward, from an image's latent to noise, one model prediction per step: inversion
    step `index` undoes sampling step `solver_step(index)` (the last first)."""

    def __init__(self, solver: Solver) -> None:
        """Wrap a solver.

        Args:
            solver: The generation solver (its steps are walked in reverse).
        """
        self.solver = solver
        self.num_steps = solver.num_inference_steps - solver.first_inference_step

    def solver_step(self, index: int) -> int:
        """The sampling step that inversion step `index` undoes, at whose timestep the model predicts."""
        return self.solver.num_inference_steps - 1 - index

    def step(self, x: Tensor, prediction: Tensor, index: int) -> Tensor:
        """One inversion step: from the latent before step `index` to the noisier one after it."""
        raise NotImplementedError


class DDIMInversion(Inversion):
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
        super().__init__(solver)
        self._scales, self._stds = solver.cumulative_scale_factors, solver.noise_std
        timesteps = solver.timesteps[solver.first_inference_step :]
        self._ascending = [int(t) for t in timesteps.flip(0)]
        self._spacing = solver.params.num_train_timesteps // solver.num_inference_steps

    def timestep(self, index: int) -> int:
        """The timestep at which inversion step `index` predicts the noise (ascending)."""
        return self._ascending[index]

    def step(self, x: Tensor, prediction: Tensor, index: int) -> Tensor:
        """One inversion step: from the latent before step `index` to the noisier one after it."""
        timestep = self._ascending[index]
        current = max(timestep - self._spacing, 0)  # below the schedule: the level of timestep 0
        scales, stds = self._scales, self._stds
        clean = (x - stds[current] * prediction) / scales[current]  # the clean latent estimated at this level
        return scales[timestep] * clean + stds[timestep] * prediction


class FlowInversion(Inversion):
    """Walk a flow-matching schedule upward: the Euler steps of the sampler, run backwards from the encoded image
    (sigma 0) to noise (sigma 1).

    Sampling step `k` moves `x` from `sigmas[k]` to `sigmas[k + 1]` by `(sigmas[k + 1] - sigmas[k]) * v(x, k)`.
    Inversion step `i` undoes sampling step `k = steps - 1 - i`: from `sigmas[k + 1]` to `sigmas[k]` by
    `(sigmas[k] - sigmas[k + 1]) * v`, with the velocity predicted at step `k`'s timestep from the current (less
    noisy) latent, as DDIM inversion predicts the noise. With a velocity that does not depend on `x`, sampling undoes
    the inversion exactly. Made with a `FlowMatchEuler` solver: `FlowInversion(FlowMatchEuler(28, mu=...))`.
    """

    def step(self, x: Tensor, prediction: Tensor, index: int) -> Tensor:
        """One inversion step, in float32: from `sigmas[k + 1]` up to `sigmas[k]` along the predicted velocity."""
        k, solver = self.solver_step(index), self.solver
        assert isinstance(solver, FlowMatchEuler)
        delta = solver.sigmas[k] - solver.sigmas[k + 1]
        return (x.float() + delta * prediction.float()).to(prediction.dtype)


def inversion_of(solver: Solver) -> Inversion:
    """The inversion of a solver's schedule: DDIM's, or the flow's Euler steps backwards.

    Raises:
        ValueError: For any other solver.
    """
    if isinstance(solver, DDIM):
        return DDIMInversion(solver)
    if isinstance(solver, FlowMatchEuler):
        return FlowInversion(solver)
    raise ValueError(f"no inversion for the {type(solver).__name__} solver: transfers invert with DDIM or flow_euler")


@dataclass(kw_only=True)
class ReferenceTrajectory:
    """The inversion trajectory of a reference image, reusable for many sets.

    Attributes:
        latents: `(steps + 1, *latent)`: `latents[k]` is at the noise level of the solver's `k`-th timestep (the
            noisiest first); the last is the encoded image. A latent is `(4, height / 8, width / 8)` for a U-Net,
            packed tokens `((height / 16) * (width / 16), 64)` for FLUX.1.
        timesteps: The solver's timesteps, descending (DDIM's integers, or the flow's sigmas times 1000).
        width: The image width in pixels.
        height: The image height in pixels.
        caption: The caption used for inversion; the reference's prompt when generating.
        model: The identity of the model it was made with (see `model_identity`).
        guidance: The guidance scale of the inversion (classifier-free on a U-Net, FLUX.1 [dev]'s guidance
            embedding; none for [schnell]).
    """

    latents: Tensor
    timesteps: list[float]
    width: int
    height: int
    caption: str
    model: str
    guidance: float | None

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
            "guidance": json.dumps(self.guidance),
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
            guidance=json.loads(metadata["guidance"]),
        )

    def check_fits(self, model: Model | Backbone, solver: Solver, *, width: int, height: int) -> None:
        """Check that this trajectory was made with this model, this schedule and this size.

        Raises:
            ValueError: If not, naming what differs.
        """
        problems: list[str] = []
        timesteps = schedule(solver)
        if timesteps != self.timesteps:
            same_steps = len(timesteps) == len(self.timesteps)
            problems.append(
                f"it was made for {len(self.timesteps)} steps, this set has {len(timesteps)}"
                if not same_steps
                else "it was made for another schedule (another size or model kind)"
            )
        if (width, height) != (self.width, self.height):
            problems.append(f"it was made at {self.width}x{self.height} px, this set is {width}x{height} px")
        if (identity := model_identity(model)) != self.model:
            problems.append(f"it was made with another model ({self.model}, this one is {identity})")
        if problems:
            raise ValueError(f"the reference trajectory does not fit this set: {'; '.join(problems)}")


def schedule(solver: Solver) -> list[float]:
    """The timesteps a solver runs, descending: those a trajectory is made for (DDIM's as integers)."""
    timesteps = solver.timesteps[solver.first_inference_step :]
    return [float(t) if timesteps.is_floating_point() else int(t) for t in timesteps]


def model_identity(model: Model | Backbone) -> str:
    """A short identity of a model: its kind and a hash of some of its U-Net's or transformer's weights."""
    backbone = backbone_of(model)
    digest = hashlib.sha1(backbone.kind.encode())
    parameters = list(backbone.target.parameters())
    for tensor in parameters[:4] + parameters[-4:]:
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return f"{backbone.kind}-{digest.hexdigest()[:12]}"


def encode_image(model: Model | Backbone, image: Image.Image, *, width: int, height: int, fit: Fit = "crop") -> Tensor:
    """Fit an image to the size (see `fit_image`) and encode it: `(1, *latent)`, in the set's layout (see
    `Backbone.encode`)."""
    backbone = backbone_of(model)
    with torch.no_grad(), backbone.stage("encode"):
        return backbone.encode(fit_image(image, width, height, fit=fit))


def invert(
    model: Model | Backbone,
    latents: Tensor,
    caption: str,
    *,
    solver: Solver,
    guidance: float | None = 2.0,
    width: int | None = None,
    height: int | None = None,
    progress: Progress | None = None,
) -> ReferenceTrajectory:
    """Invert an encoded image under its caption along the solver's schedule (see `inversion_of`).

    Args:
        model: The model (without StyleAligned injected: the image is inverted alone).
        latents: The encoded image `(1, *latent)` (see `encode_image`).
        caption: A caption of the image.
        solver: The solver the sets will be generated with (DDIM, or FLUX.1's flow-matching Euler).
        guidance: The guidance scale of the predictions: classifier-free on a U-Net (2 in the reference example),
            FLUX.1 [dev]'s guidance embedding; None for [schnell].
        width: The image width in pixels (default: from U-Net latents).
        height: The image height in pixels (default: from U-Net latents).
        progress: Called after each step (phase `"invert"`).

    Returns:
        The trajectory, from the noisiest latent to the encoded image.
    """
    backbone = backbone_of(model)
    width = width or latents.shape[-1] * 8
    height = height or latents.shape[-2] * 8
    inversion = inversion_of(solver)
    spec = SetSpec(prompts=[caption], width=width, height=height, guidance=guidance)
    cfg = backbone.kind not in FLUX_KINDS  # U-Nets: classifier-free guidance at any scale, as the reference
    with backbone.stage("text"):
        conditioning = backbone.conditioning(spec)([0], cfg)
    x = latents
    trajectory = [x]
    with torch.no_grad(), backbone.stage("denoise"):
        for index in range(inversion.num_steps):
            step = inversion.solver_step(index)
            prediction = backbone.predict(
                x,
                step,
                solver=solver,
                conditioning=conditioning,
                guidance=guidance or 0.0,
                classifier_free_guidance=cfg,
            )
            x = inversion.step(x, prediction, index)
            trajectory.append(x)
            if progress:
                progress(ProgressEvent.inverted(step=index + 1, steps=inversion.num_steps))
    return ReferenceTrajectory(
        latents=torch.cat(trajectory[::-1]),
        timesteps=schedule(solver),
        width=width,
        height=height,
        caption=caption,
        model=model_identity(backbone),
        guidance=guidance,
    )
