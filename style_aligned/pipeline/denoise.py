"""The denoising loop of a set: one model call per chunk of targets and step, the references riding with the first
chunk and recorded for the others, at constant memory, under any of the solvers of `style_aligned.pipeline.solvers`."""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.pipeline.composition import Composition
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.model import StableDiffusion, lcm_guidance_embedding
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.progress import Preview, Progress, ProgressEvent
from style_aligned.pipeline.solvers import fresh_copy, image_generators, is_stochastic, solver_step
from style_aligned.pipeline.spec import SetSpec


def predict_noise(
    sd: StableDiffusion,
    x: Tensor,
    step: int,
    *,
    solver: Solver,
    conditioning: dict[str, Tensor],
    guidance: float,
    classifier_free_guidance: bool,
) -> Tensor:
    """The guided noise prediction of a batch of latents, as `LatentDiffusionModel.forward` computes it."""
    sd.set_unet_context(timestep=solver.timesteps[step].unsqueeze(dim=0), **conditioning)
    latents = torch.cat((x, x)) if classifier_free_guidance else x
    latents = solver.scale_model_input(latents, step=step)
    if not classifier_free_guidance:
        return sd.unet(latents)
    unconditional, conditional = sd.unet(latents).chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def denoise_set(
    sd: StableDiffusion,
    adapter: StyleAlignedAdapter[Any],
    latents: Tensor,
    *,
    conditioning: SetConditioning,
    guidance: float,
    chunk_size: int | None = None,
    steps: Sequence[int] | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    before_call: Callable[[list[int]], None] | None = None,
    progress: Progress | None = None,
    solver: Solver | None = None,
    generators: Sequence[torch.Generator] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run the denoising loop of a set whose first latents are the references, in the model calls of `SetPlan.calls`.

    The references run in the same call as the first chunk of targets, while the adapter records their features; the
    other chunks use the recording. The batch has two halves (unconditional, conditional) when the adapter is made
    with `classifier_free_guidance=True`, else one. Every call keeps its own copy of the solver, so that a solver with
    a history (DPM-Solver++) never mixes the histories of different calls.

    Args:
        sd: The model, with `adapter` injected in its U-Net.
        adapter: The StyleAligned adapter.
        latents: The initial latents, the reference first: `(images, 4, height / 8, width / 8)`.
        conditioning: The text conditioning of the images.
        guidance: The classifier-free guidance scale (unused without classifier-free guidance).
        chunk_size: How many targets run together (default: all).
        steps: The solver steps to run (default: all of the solver's).
        after_reference_step: Called with (step, reference latent) after each reference step; returns the latent
            to continue from (style transfer makes the reference follow an inversion trajectory this way).
        before_call: Called with the images of each U-Net call before it (to set per-image control inputs).
        progress: Called after each U-Net call, over the set's work (`SetPlan.work`; decoding comes last).
        solver: The solver (default: the model's); it is copied, never stepped itself.
        generators: One generator per image, for a stochastic solver (default: the global generator, shared).
        targets: Only these targets are denoised, whole chunks of the set (default: all); the reference is computed
            as for the whole set, so a set split into shares of chunks gives the same latents as the whole set.

    Returns:
        The final latents (the targets not denoised are left as they were).
    """
    solver = sd.solver if solver is None else solver
    steps = list(solver.inference_steps if steps is None else steps)
    x = latents.clone()
    cache = adapter.reference_cache
    plan = SetPlan(x.shape[0], cache.num_references, chunk_size)
    groups = plan.calls(targets)
    solvers = [fresh_copy(solver) for _ in groups]
    total = plan.work(targets, steps=len(steps))
    cfg = adapter.classifier_free_guidance
    phase = "targets" if len(groups[0]) > cache.num_references else "reference"
    report = _call_reporter(progress, total=total, phase=phase, steps=len(steps), calls=len(groups))

    with torch.no_grad():
        for step_number, step in enumerate(steps, start=1):
            for call, images in enumerate(groups, start=1):
                if before_call:
                    before_call(images)
                rows = _rows(images, x.device)
                mode = cache.record() if call == 1 else cache.replay()
                with mode if len(groups) > 1 else contextlib.nullcontext():
                    noise = predict_noise(
                        sd,
                        x[rows],
                        step,
                        solver=solvers[call - 1],
                        conditioning=conditioning(images, cfg),
                        guidance=guidance,
                        classifier_free_guidance=cfg,
                    )
                rng = None if generators is None else [generators[image] for image in images]
                x[rows] = solver_step(solvers[call - 1], x[rows], noise, step=step, generators=rng)
                if call == 1 and after_reference_step is not None:
                    x[: plan.num_references] = after_reference_step(step, x[: plan.num_references])
                report(step_number, call)
            cache.clear()
    return x


def _call_reporter(
    progress: Progress | None, *, total: int, phase: str, steps: int, calls: int
) -> Callable[[int, int], None]:
    """Reports model call `call` of step `step` (1-based) to `progress`, if given."""

    def report(step: int, call: int) -> None:
        if progress:
            done = (step - 1) * calls + call
            progress(
                ProgressEvent(done=done, total=total, phase=phase, step=step, steps=steps, chunk=call, chunks=calls)
            )

    return report


def _rows(images: list[int], device: torch.device) -> slice | Tensor:
    """The rows of a batch's images: a slice when they follow one another, else their indices."""
    if images == list(range(images[0], images[-1] + 1)):
        return slice(images[0], images[-1] + 1)
    return torch.tensor(images, device=device)


def denoise_with_extras(
    sd: StableDiffusion,
    spec: SetSpec,
    latents: Tensor,
    *,
    solver: Solver,
    progress: Progress | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run `denoise_set` under `solver` with the spec's extras applied and StyleAligned injected, then remove them.

    Without classifier-free guidance (a guidance scale of 1 or less, or a model with an LCM guidance embedding, which
    then gets the guidance scale), the adapter is made with `classifier_free_guidance=False` and the batch has one
    half. A stochastic solver draws each image's noise from a generator seeded by the spec's seed and the image.
    The model's adapters, weights and LCM guidance scale are as before when this returns, whether it succeeds or fails.

    Args:
        sd: The model.
        spec: The resolved set (its `style`, extras, size, guidance, seed and chunk size are used).
        latents: The initial latents, the reference first (scaled for the solver: see `initial_latents`).
        solver: The solver to denoise with (copied, not stepped itself).
        progress: See `denoise_set`.
        after_reference_step: See `denoise_set`.
        targets: See `denoise_set`.

    Returns:
        The final latents.
    """
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    conditioning = SetConditioning(sd, spec.image_prompts(), spec.negative_prompt, width=spec.width, height=spec.height)
    lcm = lcm_guidance_embedding(sd)
    cfg = spec.classifier_free_guidance and lcm is None
    adapter = StyleAlignedAdapter(
        sd.unet, spec.style, classifier_free_guidance=cfg, reference_weights=spec.mixture_weights()
    )
    generators = image_generators(spec.seed, latents.shape[0], sd.device) if is_stochastic(solver) else None
    previous_scale = None if lcm is None else lcm.condition_scale
    try:
        if lcm is not None:
            lcm.set_condition_scale(spec.guidance)
        with Composition(sd, spec.extras(), latents.shape[0], width=spec.width, height=spec.height) as composition:
            adapter.inject()
            try:
                return denoise_set(
                    sd,
                    adapter,
                    latents,
                    conditioning=conditioning,
                    guidance=spec.guidance,
                    chunk_size=spec.chunk_size,
                    after_reference_step=after_reference_step,
                    before_call=lambda images: composition.before_call(images, classifier_free_guidance=cfg),
                    progress=progress,
                    solver=solver,
                    generators=generators,
                    targets=targets,
                )
            finally:
                adapter.eject()
    finally:
        if lcm is not None and previous_scale is not None:
            lcm.set_condition_scale(previous_scale)


def with_preview(
    after_reference_step: Callable[[int, Tensor], Tensor] | None, preview: Preview | None
) -> Callable[[int, Tensor], Tensor] | None:
    """An `after_reference_step` for `denoise_set` that also shows each new reference latent to `preview`."""
    if preview is None:
        return after_reference_step

    def step(timestep: int, latent: Tensor) -> Tensor:
        latent = after_reference_step(timestep, latent) if after_reference_step else latent
        preview(latent)
        return latent

    return step
