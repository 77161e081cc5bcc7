"""The denoising loop of a set: one model call per chunk of targets and step, the references riding with the first
chunk and recorded for the others, at constant memory, under any of the solvers of `style_aligned.pipeline.solvers`."""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.pipeline.backbone import Backbone, Conditioning, backbone_of
from style_aligned.pipeline.model import Model
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.progress import Preview, Progress, ProgressEvent
from style_aligned.pipeline.solvers import fresh_copy, image_generators, is_stochastic, solver_step
from style_aligned.pipeline.spec import SetSpec


def denoise_set(
    model: Model | Backbone,
    adapter: StyleAlignedAdapter[Any],
    latents: Tensor,
    *,
    conditioning: Conditioning,
    guidance: float,
    chunk_size: int | None = None,
    steps: Sequence[int] | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    before_call: Callable[[list[int]], None] | None = None,
    progress: Progress | None = None,
    solver: Solver,
    generators: Sequence[torch.Generator] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run the denoising loop of a set whose first latents are the references, in the model calls of `SetPlan.calls`.

    The references run in the same call as the first chunk of targets, while the adapter records their features; the
    other chunks use the recording. The batch has two halves (unconditional, conditional) when the adapter is made
    with `classifier_free_guidance=True`, else one. Every call keeps its own copy of the solver, so that a solver with
    a history (DPM-Solver++) never mixes the histories of different calls.

    Args:
        model: The model (or its backbone), with `adapter` injected in its U-Net or transformer.
        adapter: The StyleAligned adapter.
        latents: The initial latents, the reference first (`(images, 4, height / 8, width / 8)` for a U-Net, packed
            tokens for FLUX.1).
        conditioning: The text conditioning of the images.
        guidance: The classifier-free guidance scale (unused without classifier-free guidance).
        chunk_size: How many targets run together (default: all).
        steps: The solver steps to run (default: all of the solver's).
        after_reference_step: Called with (step, reference latent) after each reference step; returns the latent
            to continue from (style transfer makes the reference follow an inversion trajectory this way).
        before_call: Called with the images of each U-Net call before it (to set per-image control inputs).
        progress: Called after each U-Net call, over the set's work (`SetPlan.work`; decoding comes last).
        solver: The solver; it is copied, never stepped itself.
        generators: One generator per image, for a stochastic solver (default: the global generator, shared).
        targets: Only these targets are denoised, whole chunks of the set (default: all); the reference is computed
            as for the whole set, so a set split into shares of chunks gives the same latents as the whole set.

    Returns:
        The final latents (the targets not denoised are left as they were).
    """
    backbone = backbone_of(model)
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
                    noise = backbone.predict(
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
    model: Model | Backbone,
    spec: SetSpec,
    latents: Tensor,
    *,
    solver: Solver,
    progress: Progress | None = None,
    after_reference_step: Callable[[int, Tensor], Tensor] | None = None,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Run `denoise_set` under `solver` with the spec's extras applied and StyleAligned injected, then remove them.

    The text conditioning is made first (the text encoders' stage), then the denoising (the U-Net's or the
    transformer's stage). Without classifier-free guidance (a guidance scale of 1 or less, a model with an LCM
    guidance embedding, which then gets the guidance scale, or FLUX.1), the adapter is made with
    `classifier_free_guidance=False` and the batch has one half. A stochastic solver draws each image's noise from a
    generator seeded by the spec's seed and the image. The model's adapters, weights and LCM guidance scale are as
    before when this returns, whether it succeeds or fails.

    Args:
        model: The model (or its backbone).
        spec: The resolved set (its `style`, extras, size, guidance, seed and chunk size are used).
        latents: The initial latents, the reference first (scaled for the solver: see `Backbone.initial_latents`).
        solver: The solver to denoise with (copied, not stepped itself).
        progress: See `denoise_set`.
        after_reference_step: See `denoise_set`.
        targets: See `denoise_set`.

    Returns:
        The final latents.
    """
    backbone = backbone_of(model)
    assert spec.guidance is not None or backbone.kind == "flux_schnell"
    with backbone.stage("text"):
        conditioning = backbone.conditioning(spec)
    cfg = backbone.classifier_free_guidance(spec)
    adapter = StyleAlignedAdapter(
        backbone.target, spec.style, classifier_free_guidance=cfg, reference_weights=spec.mixture_weights()
    )
    generators = image_generators(spec.seed, latents.shape[0], backbone.device) if is_stochastic(solver) else None
    with backbone.stage("denoise"), backbone.composed(spec, latents.shape[0]) as before_call:
        adapter.inject()
        try:
            return denoise_set(
                backbone,
                adapter,
                latents,
                conditioning=conditioning,
                guidance=spec.guidance or 0.0,
                chunk_size=spec.chunk_size,
                after_reference_step=after_reference_step,
                before_call=before_call,
                progress=progress,
                solver=solver,
                generators=generators,
                targets=targets,
            )
        finally:
            adapter.eject()


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
