"""The flow-matching solver equals diffusers' `FlowMatchEulerDiscreteScheduler` as `FluxPipeline` sets it up."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler  # type: ignore[import-untyped]
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift  # type: ignore

from style_aligned.flux import FlowMatchEuler, calculate_shift

DEV = {  # FLUX.1-dev's scheduler_config.json
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCHNELL = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}  # FLUX.1-schnell's


@pytest.mark.parametrize(
    ("config", "steps", "tokens"),
    [(DEV, 28, 4096), (DEV, 10, 256), (DEV, 3, 1024), (SCHNELL, 4, 4096)],
    ids=["dev-1024px", "dev-256px", "dev-512px", "schnell"],
)
def test_schedule_and_step_equal_diffusers(config: dict[str, object], steps: int, tokens: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = diffusers_shift(tokens, 256, 4096, 0.5, 1.15)
    assert calculate_shift(tokens) == mu
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    solver = FlowMatchEuler(steps, mu=mu if config["use_dynamic_shifting"] else None)
    assert torch.equal(solver.sigmas, scheduler.sigmas)
    assert torch.equal(solver.timesteps, scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    x, velocity = torch.randn(2, 16, 64, generator=generator), torch.randn(2, 16, 64, generator=generator)
    for step in (0, steps - 1):
        scheduler._step_index = step  # pyright: ignore[reportPrivateUsage]
        expected = scheduler.step(velocity, scheduler.timesteps[step], x).prev_sample
        assert torch.equal(solver(x, velocity, step), expected)


def test_noise_and_rebuild() -> None:
    solver = FlowMatchEuler(4, mu=calculate_shift(1024))
    x, noise = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    sigma = solver.sigmas[1]
    assert torch.allclose(solver.add_noise(x, noise, 1), (1 - sigma) * x + sigma * noise)
    assert torch.allclose(solver.remove_noise(solver.add_noise(x, noise, 1), noise - x, 1), x, atol=1e-6)
    rebuilt = solver.rebuild(num_inference_steps=None, first_inference_step=2)
    assert torch.equal(rebuilt.sigmas, solver.sigmas) and rebuilt.first_inference_step == 2
    assert solver.sigmas[0] == 1 and solver.sigmas[-1] == 0 and solver.timesteps[0] == 1000
    with pytest.raises(ValueError, match="invalid step"):
        solver(x, noise, 4)
