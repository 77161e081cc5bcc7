"""The solvers through the set machinery (`denoise_set`), on a small noise predictor: exact DDIM, chunk invariance."""

from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler  # type: ignore[import-untyped]
from refiners.foundationals.latent_diffusion.solvers import DDIM, DPMSolver, Euler, LCMSolver, Solver

from style_aligned import ReferenceCache
from style_aligned.pipeline.denoise import denoise_set
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.solvers import ExactDDIM, image_generators, image_seed, make_solver
from style_aligned.pipeline.unet_backbone import UNetBackbone

RELATIVE = 1e-5


class NoisePredictor:
    """Stands for a model: a fixed, nonlinear function of each row's latent, timestep and text embedding."""

    def __init__(self) -> None:
        self.context: dict[str, torch.Tensor] = {}
        self.calls: list[int] = []

    def set_unet_context(self, *, timestep: torch.Tensor, clip_text_embedding: torch.Tensor, **_: Any) -> None:
        self.context = {"timestep": timestep, "text": clip_text_embedding}

    def unet(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        t = self.context["timestep"].float() / 1000
        text = self.context["text"].reshape(-1, 1, 1, 1)
        return torch.tanh(0.7 * x + text) * (0.5 + t) + 0.1 * torch.sin(3 * x + 5 * t)


class Conditioning:
    """Row `i` of the conditional half gets the text value `i + 1`, of the unconditional half `-(i + 1) / 2`."""

    def __call__(self, images: list[int], classifier_free_guidance: bool = True) -> dict[str, torch.Tensor]:
        conditional = [float(i + 1) for i in images]
        unconditional = [-(i + 1) / 2 for i in images] if classifier_free_guidance else []
        return {"clip_text_embedding": torch.tensor(unconditional + conditional)}


class Adapter:
    def __init__(self, classifier_free_guidance: bool = True) -> None:
        self.reference_cache = ReferenceCache()
        self.classifier_free_guidance = classifier_free_guidance


def noise(count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def run_set(solver: Solver, latents: torch.Tensor, chunk_size: int | None = None, **options: Any) -> torch.Tensor:
    cfg = options.pop("classifier_free_guidance", True)
    predictor = NoisePredictor()
    adapter: Any = Adapter(cfg)
    x = denoise_set(
        UNetBackbone(predictor),  # type: ignore[arg-type]
        adapter,
        latents,
        conditioning=Conditioning(),
        guidance=5.0,
        chunk_size=chunk_size,
        solver=solver,
        **options,
    )  # type: ignore[arg-type]
    assert predictor.calls == [
        row * (2 if cfg else 1) for row in map(len, SetPlan(latents.shape[0], 1, chunk_size).calls())
    ] * len(solver.inference_steps)
    return x


def diffusers_ddim(steps: int, latents: torch.Tensor) -> torch.Tensor:
    """The reference examples' loop: diffusers' DDIMScheduler, as they configure it, on the same predictions."""
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    predictor, conditioning = NoisePredictor(), Conditioning()
    x = latents.clone()
    images = list(range(latents.shape[0]))
    for t in scheduler.timesteps:
        predictor.set_unet_context(timestep=t[None], **conditioning(images))
        unconditional, conditional = predictor.unet(torch.cat([x, x])).chunk(2)
        guided = unconditional + 5.0 * (conditional - unconditional)
        x = scheduler.step(guided, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 50])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_ddim_set_loop_equals_diffusers_ddim_scheduler(steps: int, chunk_size: int | None) -> None:
    latents = noise()
    expected = diffusers_ddim(steps, latents)
    solver = make_solver("ddim", steps)
    assert isinstance(solver, ExactDDIM)
    assert solver.timesteps.tolist() == [t * (1000 // steps) for t in reversed(range(steps))]
    actual = run_set(solver, latents, chunk_size)
    assert (actual - expected).norm() <= RELATIVE * expected.norm()
    assert (actual - expected).abs().max() <= RELATIVE * expected.abs().max()
    # Refiners' own DDIM drops the noise term at the last step: it differs, which the exact solver fixes
    refiners = run_set(DDIM(steps, params=solver.params), latents, chunk_size)
    assert (refiners - expected).norm() > 10 * RELATIVE * expected.norm()


@pytest.mark.parametrize("name", ["ddim", "dpm", "euler", "lcm"])
@pytest.mark.parametrize("classifier_free_guidance", [True, False])
def test_every_solver_gives_the_same_set_in_chunks_and_in_one_batch(name: str, classifier_free_guidance: bool) -> None:
    latents = noise(8)
    solver = make_solver(name, 4, spacing="trailing")  # type: ignore[arg-type]
    options: dict[str, Any] = {"classifier_free_guidance": classifier_free_guidance}
    seeded = {"generators": image_generators(3, 8, torch.device("cpu"))}
    whole = run_set(solver, latents, None, **options, **seeded)
    for chunk_size in (2, 7):
        seeded = {"generators": image_generators(3, 8, torch.device("cpu"))}
        assert torch.equal(run_set(solver, latents, chunk_size, **options, **seeded), whole)
    # the reference alone, with the same solver and its generator, is the set's reference
    seeded = {"generators": image_generators(3, 1, torch.device("cpu"))}
    assert torch.allclose(run_set(solver, latents[:1], None, **options, **seeded), whole[:1], rtol=1e-6, atol=1e-6)


def test_dpm_history_is_kept_per_call() -> None:
    solver = make_solver("dpm", 6)
    latents = noise(5)
    run_set(solver, latents, 2)
    assert isinstance(solver, DPMSolver) and solver.estimated_data[-1].numel() == 0  # the given solver is untouched


def test_lcm_noise_is_drawn_per_image_from_the_seed() -> None:
    solver = make_solver("lcm", 4)
    latents = noise(4)
    first = run_set(solver, latents, 1, generators=image_generators(5, 4, torch.device("cpu")))
    again = run_set(solver, latents, 3, generators=image_generators(5, 4, torch.device("cpu")))
    other = run_set(solver, latents, 3, generators=image_generators(6, 4, torch.device("cpu")))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert image_seed(5, 0) != image_seed(5, 1) and image_seed(5, 1) == image_seed(5, 1)


def test_solver_names_spacings_and_defaults() -> None:
    assert isinstance(make_solver("dpm", 20), DPMSolver)
    assert isinstance(make_solver("euler", 4), Euler)
    assert isinstance(make_solver("lcm", 4), LCMSolver)
    assert make_solver("euler", 4, spacing="trailing").timesteps.tolist() == [999, 749, 499, 249]
    assert make_solver("ddim", 4, spacing="trailing").timesteps.tolist() == [999, 749, 499, 249]
    assert make_solver("ddim", 4, spacing="linspace").timesteps.tolist() == [999, 666, 333, 0]
    assert make_solver("ddim", 50).timesteps[:2].tolist() == [980, 960]
    for bad, message in ((("heun", 4), "unknown solver"), (("lcm", 51), "at most 50"), (("ddim", 0), "at least 1")):
        with pytest.raises(ValueError, match=message):
            make_solver(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        make_solver("ddim", 4, spacing="karras")  # type: ignore[arg-type]
    assert SetPlan(5, 1, 2).work(steps=4) == 4 * 2 + 5 and SetPlan(5, 1, 2).calls() == [[0, 1, 2], [3, 4]]
    assert SetPlan(1).calls() == [[0]] and SetPlan(3).calls() == [[0, 1, 2]]


def test_a_model_with_an_lcm_guidance_embedding_is_found() -> None:
    from types import SimpleNamespace

    from refiners.foundationals.latent_diffusion import SDXLUNet
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.lcm import SDXLLcmAdapter

    from style_aligned.pipeline.model import lcm_guidance_embedding

    with torch.device("meta"):
        unet = SDXLUNet(in_channels=4)
    model: Any = SimpleNamespace(unet=unet)
    assert lcm_guidance_embedding(model) is None
    adapter = SDXLLcmAdapter(unet, condition_scale=8.0).inject()
    assert lcm_guidance_embedding(model) is adapter
    adapter.eject()
    assert lcm_guidance_embedding(model) is None
