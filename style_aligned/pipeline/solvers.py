"""The solvers a set can be denoised with, built on Refiners' solvers, and their per-image randomness.

`ddim` with leading spacing is the solver of the reference examples (diffusers' `DDIMScheduler` with
`set_alpha_to_one=False`, scaled-linear betas from 0.00085 to 0.012, no offset), exact to it step for step, the last
step included. `dpm` (DPM-Solver++ 2M) needs about half the steps of DDIM; `euler` and `lcm` serve the few-step
distilled models (see docs/generation.md for recipes).
"""

import copy
from typing import Literal, get_args

import numpy as np
import torch
from refiners.foundationals.latent_diffusion.solvers import (
    DDIM,
    DPMSolver,
    Euler,
    LCMSolver,
    Solver,
    SolverParams,
    TimestepSpacing,
)
from torch import Generator, Tensor

from style_aligned.pipeline.model import StableDiffusion

SolverName = Literal["ddim", "dpm", "euler", "lcm", "flow_euler"]
Spacing = Literal["leading", "trailing", "linspace"]
SOLVERS: tuple[SolverName, ...] = get_args(SolverName)
UNET_SOLVERS: tuple[SolverName, ...] = ("ddim", "dpm", "euler", "lcm")
"""The solvers of the SD1 and SDXL U-Nets; `flow_euler` is FLUX.1's flow-matching Euler solver, on its own schedule
(see `style_aligned.flux.FluxModels.solver`)."""
SPACINGS: tuple[Spacing, ...] = get_args(Spacing)

_SPACINGS = {
    "leading": TimestepSpacing.LEADING,
    "trailing": TimestepSpacing.TRAILING,
    "linspace": TimestepSpacing.LINSPACE_ROUNDED,  # whole timesteps, as every solver indexes its schedule with them
}


class ExactDDIM(DDIM):
    """DDIM exactly as diffusers' `DDIMScheduler` with `set_alpha_to_one=False` and `eta=0` computes it.

    Refiners' `DDIM` drops the noise term at the last step. Here every step, the last included, is
    `x = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev) * eps` with `x0_pred = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)`,
    `a_t` the cumulative alpha of the step's timestep and `a_prev` that of the next timestep, or of timestep 0 after
    the last step.
    """

    def __call__(self, x: Tensor, predicted_noise: Tensor, step: int, generator: Generator | None = None) -> Tensor:
        """Apply one step of the backward diffusion process (`generator` is ignored: the solver is deterministic)."""
        if not self.first_inference_step <= step < self.num_inference_steps:
            raise ValueError(f"invalid step {step} for {self.num_inference_steps} steps")
        timestep = int(self.timesteps[step])
        previous = int(self.timesteps[step + 1]) if step < self.num_inference_steps - 1 else 0
        # sqrt(a) and sqrt(1 - a), computed in float32 from the cumulative product of the schedule
        scales, stds = self.cumulative_scale_factors, self.noise_std
        predicted_x = (x - stds[timestep] * predicted_noise) / scales[timestep]
        return scales[previous] * predicted_x + stds[previous] * predicted_noise


def make_solver(
    name: SolverName,
    steps: int,
    *,
    spacing: Spacing | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Solver:
    """Build a solver by name.

    Args:
        name: `"ddim"` (default spacing leading, no offset: the reference examples' DDIM, exact to diffusers), `"dpm"`
            (DPM-Solver++ 2M, Refiners' default spacing), `"euler"` (default spacing linspace) or `"lcm"` (default
            spacing trailing).
        steps: The number of denoising steps.
        spacing: How the timesteps are spread over the schedule (default: the solver's own).
        device: The device of the solver's tensors.
        dtype: The dtype of the solver's tensors.

    Returns:
        A fresh solver.

    Raises:
        ValueError: If the name or spacing is unknown (or FLUX.1's `flow_euler`), or the steps out of range.
    """
    if name not in UNET_SOLVERS:
        raise ValueError(f"unknown solver {name!r} for a U-Net: choose one of {', '.join(UNET_SOLVERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    timesteps_spacing = None if spacing is None else _SPACINGS[spacing]
    match name:
        case "ddim":
            params = SolverParams(timesteps_spacing=timesteps_spacing or TimestepSpacing.LEADING, timesteps_offset=0)
            return ExactDDIM(num_inference_steps=steps, params=params, device=device, dtype=dtype)
        case "dpm":
            params = SolverParams(timesteps_spacing=timesteps_spacing)
            return DPMSolver(num_inference_steps=steps, params=params, device=device, dtype=dtype)
        case "euler":
            params = SolverParams(timesteps_spacing=timesteps_spacing or TimestepSpacing.LINSPACE_ROUNDED)
            return Euler(num_inference_steps=steps, params=params, device=device, dtype=dtype)
        case "lcm":
            if steps > 50:
                raise ValueError(f"the LCM solver takes at most 50 steps, got {steps}")
            params = SolverParams(timesteps_spacing=timesteps_spacing)
            return LCMSolver(num_inference_steps=steps, params=params, device=device, dtype=dtype)
        case "flow_euler":
            raise AssertionError("unreachable: flow_euler is not a U-Net solver")


def is_stochastic(solver: Solver) -> bool:
    """Whether the solver draws noise at its steps (LCM re-noises between steps)."""
    return isinstance(solver, LCMSolver)


def fresh_copy(solver: Solver) -> Solver:
    """A copy of a solver with its own state (DPM-Solver++ keeps the last predictions of its batch)."""
    return copy.deepcopy(solver)


def image_seed(seed: int, index: int) -> int:
    """The seed of the solver noise of image `index` of a set: independent of the chunk an image runs in."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_generators(seed: int, count: int, device: torch.device) -> list[Generator]:
    """One seeded generator per image of a set, for the noise of a stochastic solver (see `image_seed`)."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, index)) for index in range(count)]


def solver_step(
    solver: Solver,
    x: Tensor,
    predicted_noise: Tensor,
    *,
    step: int,
    generators: list[Generator] | None = None,
) -> Tensor:
    """One solver step on a batch of images; a stochastic solver draws each image's noise from its own generator.

    Args:
        solver: The solver (of this batch of images only, when it keeps state).
        x: The latents: `(images, 4, height / 8, width / 8)`.
        predicted_noise: The guided noise prediction, shaped as `x`.
        step: The solver step.
        generators: One generator per image (used by stochastic solvers only).

    Returns:
        The latents after the step.
    """
    if generators is None or not is_stochastic(solver):
        return solver(x, predicted_noise=predicted_noise, step=step)
    rows = [
        solver(x[i : i + 1], predicted_noise=predicted_noise[i : i + 1], step=step, generator=generators[i])
        for i in range(x.shape[0])
    ]
    return torch.cat(rows)


def ddim(sd: StableDiffusion, steps: int) -> ExactDDIM:
    """The DDIM solver of the reference examples: scaled-linear betas from 0.00085 to 0.012, leading spacing,
    timesteps `[980, 960, ..., 0]` for 50 steps (offset 0), final cumulative alpha that of timestep 0, and the last
    step as diffusers' `DDIMScheduler` computes it (see `ExactDDIM`)."""
    solver = make_solver("ddim", steps, device=sd.device, dtype=sd.dtype)
    assert isinstance(solver, ExactDDIM)
    return solver
