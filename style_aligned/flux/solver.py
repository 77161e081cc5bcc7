"""The flow-matching Euler solver of FLUX.1, with its resolution-dependent time shift.

Refiners 0.4 has no flow-matching solver; this one computes what diffusers' `FlowMatchEulerDiscreteScheduler`
computes as `FluxPipeline` sets it up: sigmas `linspace(1, 1/N, N)` (in float32), shifted either by
`exp(mu) / (exp(mu) + (1/s - 1))` with `mu` linear in the image's token count ([dev]: dynamic shifting) or by
`shift * s / (1 + (shift - 1) * s)` ([schnell]: shift 1, no change), then a final sigma 0; timesteps are the sigmas
times 1000. A step moves the latents along the predicted velocity: `x + (sigma_next - sigma) * v`.
"""

import math

import numpy as np
import torch
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Generator, Tensor
from torch import device as Device
from torch import dtype as DType

BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


def calculate_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = BASE_IMAGE_SEQ_LEN,
    max_seq_len: int = MAX_IMAGE_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """The time shift `mu` of an image of `image_seq_len` tokens: 0.5 at 256 tokens, 1.15 at 4096, linear between
    (and beyond)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flow_sigmas(num_inference_steps: int, *, mu: float | None = None, shift: float = 1.0) -> Tensor:
    """The sigmas of a FLUX.1 schedule, from 1 (pure noise) down, with a final 0.

    Args:
        num_inference_steps: The number of steps.
        mu: The dynamic time shift (see `calculate_shift`); None for a static shift.
        shift: The static shift, used where `mu` is None (1: no shift).

    Returns:
        `num_inference_steps + 1` sigmas in float32.
    """
    if num_inference_steps < 1:
        raise ValueError(f"a schedule needs at least one step, not {num_inference_steps}")
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    shifted = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))  # pyright: ignore[reportUnknownMemberType]
    return torch.cat((shifted, torch.zeros(1)))


class FlowMatchEuler(Solver):
    """Euler steps of a rectified flow, whose model predicts the velocity `noise - x0`.

    Example:
        ```py
        tokens = (height // 16) * (width // 16)
        solver = FlowMatchEuler(28, mu=calculate_shift(tokens))  # FLUX.1 [dev]
        solver = FlowMatchEuler(4)  # FLUX.1 [schnell]
        ```
    """

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        *,
        mu: float | None = None,
        shift: float = 1.0,
        device: Device | str = "cpu",
        dtype: DType = torch.float32,
    ) -> None:
        """Build the schedule.

        Args:
            num_inference_steps: The number of steps.
            first_inference_step: The first step to run (later ones start from partly noised latents).
            mu: The dynamic time shift of [dev] (see `calculate_shift`); None for a static shift.
            shift: The static shift, used where `mu` is None ([schnell]: 1, no shift).
            device: The PyTorch device of the schedule.
            dtype: The dtype of the timesteps given to the model (sigmas and steps stay in float32).
        """
        self.mu, self.shift = mu, shift
        self.sigmas = flow_sigmas(num_inference_steps, mu=mu, shift=shift)
        super().__init__(num_inference_steps, first_inference_step, device=device, dtype=dtype)
        self.sigmas = self.sigmas.to(device=device)

    def _generate_timesteps(self) -> Tensor:
        return self.sigmas[:-1] * 1000

    def __call__(self, x: Tensor, predicted_noise: Tensor, step: int, generator: Generator | None = None) -> Tensor:
        """One Euler step along the predicted velocity, computed in float32 (`generator` is ignored).

        Args:
            x: The latents at `sigmas[step]`.
            predicted_noise: The predicted velocity `noise - x0`.
            step: The step.

        Returns:
            The latents at `sigmas[step + 1]`, in the dtype of `predicted_noise`.
        """
        if not self.first_inference_step <= step < self.num_inference_steps:
            raise ValueError(f"invalid step {step} for {self.num_inference_steps} steps")
        delta = self.sigmas[step + 1] - self.sigmas[step]
        return (x.float() + delta * predicted_noise).to(predicted_noise.dtype)

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """The point of the flow at `sigmas[step]`: `(1 - sigma) * x + sigma * noise`."""
        sigma = self.sigmas[step]
        return sigma * noise + (1.0 - sigma) * x

    def remove_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """The clean latents the velocity `noise` points to from `x` at `sigmas[step]`: `x - sigma * v`."""
        return x - self.sigmas[step] * noise

    def rebuild(self, num_inference_steps: int | None, first_inference_step: int | None = None) -> "FlowMatchEuler":
        """The same solver with another number of steps or first step (and the same shift)."""
        return FlowMatchEuler(
            self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            self.first_inference_step if first_inference_step is None else first_inference_step,
            mu=self.mu,
            shift=self.shift,
            device=self.device,
            dtype=self.dtype,
        )
