"""Sets on FLUX.1 through the one set engine, on FLUX.1 models a few MB large: the initial noise FluxPipeline draws,
parts equal to the whole set, the options FLUX.1 refuses, and model offload stage by stage."""

import types
from typing import Any

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # type: ignore[import-untyped]

from style_aligned.flux.models import TEXT_ENCODERS, FluxModels
from style_aligned.flux.offload import ModelOffload
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.backbone import backbone_of
from style_aligned.pipeline.composition import LoraSpec
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.spec import SetSpec
from tests.helpers.flux_sets import tiny_flux_models

PROMPTS = ["a toy train", "a toy car", "a watercolor fox"]


@pytest.fixture(scope="module")
def dev() -> FluxModels:
    return tiny_flux_models()


def spec(**changes: Any) -> SetSpec:
    return SetSpec(**({"prompts": PROMPTS, "seed": 5, "steps": 2, "width": 32, "height": 48} | changes))


def test_the_initial_noise_is_what_flux_pipeline_draws_for_the_set(dev: FluxModels) -> None:
    backbone = backbone_of(dev)
    resolved = spec().resolved(backbone.kind)
    latents = backbone.initial_latents(resolved, 3, backbone.make_solver(resolved))
    pipeline: Any = types.SimpleNamespace(
        vae_scale_factor=8,
        _pack_latents=FluxPipeline._pack_latents,
        _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids,
    )
    generator = torch.Generator("cpu").manual_seed(5)
    expected, _ = FluxPipeline.prepare_latents(pipeline, 3, 16, 48, 32, torch.float32, torch.device("cpu"), generator)
    assert torch.equal(latents, expected)
    generator = torch.Generator("cpu").manual_seed(5)
    alone, _ = FluxPipeline.prepare_latents(pipeline, 1, 16, 48, 32, torch.float32, torch.device("cpu"), generator)
    assert torch.equal(latents[:1], alone)  # image 0 starts where a plain FluxPipeline image of the seed starts


def test_a_set_is_made_and_its_parts_equal_the_whole_set(dev: FluxModels) -> None:
    events: list[ProgressEvent] = []
    whole = generate_set(dev, spec(chunk_size=1), progress=events.append)
    assert [image.size for image in whole.images] == [(32, 48)] * 3
    assert whole.spec.steps == 2 and whole.spec.solver == "flow_euler" and whole.spec.guidance == 3.5
    assert not whole.spec.classifier_free_guidance
    assert events[-1].done == events[-1].total == 2 * 2 + 3
    part = generate_set(dev, spec(chunk_size=1), images=[2])
    assert part.images[0].tobytes() == whole.images[2].tobytes()
    assert len({image.tobytes() for image in whole.images}) == 3


def test_defaults_per_flux_model() -> None:
    assert spec(steps=None, width=None, height=None).resolved("flux_dev").steps == 28
    schnell = spec(steps=None, width=None, height=None).resolved("flux_schnell")
    assert (schnell.steps, schnell.guidance, schnell.width, schnell.height) == (4, None, 1024, 1024)
    assert spec(steps=None).resolved("sdxl").steps == 50


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"negative_prompt": "blurry"}, "no negative prompt"),
        ({"loras": [LoraSpec(path="lora.safetensors")]}, "LoRAs"),
        ({"solver": "dpm"}, "its own solver, flow_euler, not dpm"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing"),
        ({"style": StyleAlignedOptions(share_group_norm=True)}, "share_group_norm"),
        ({"width": 40}, "multiples of 16"),
    ],
)
def test_what_flux_refuses_is_one_line_before_any_model(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**changes).resolved("flux_dev")


def test_schnell_takes_no_guidance_and_unets_take_no_flow_euler() -> None:
    with pytest.raises(ValueError, match=r"\[schnell\] has no guidance embedding"):
        spec(guidance=2.0).resolved("flux_schnell")
    with pytest.raises(ValueError, match="flow_euler is FLUX.1's solver"):
        spec(solver="flow_euler").resolved("sd1")


def test_with_an_offload_each_stage_has_only_its_models_on_the_accelerator() -> None:
    models = tiny_flux_models(schnell=True)
    named: dict[str, torch.nn.Module] = {
        "transformer": models.transformer,
        "autoencoder": models.autoencoder,
        "t5": models.t5.model,  # type: ignore[union-attr]
        "clip_text_encoder": models.clip_text_encoder,  # type: ignore[dict-item]
    }
    where: dict[str, str] = {}
    names = {id(module): name for name, module in named.items()}

    def move(module: torch.nn.Module, device: torch.device) -> None:  # the CPU stands for both places
        where[names[id(module)]] = "accelerator" if device.index == 1 else "cpu"

    offload = ModelOffload(named, device="cpu:1", offload_device="cpu:0", move=move)
    models.model_offload = offload
    seen: list[tuple[str, set[str]]] = []

    def progress(event: ProgressEvent) -> None:
        seen.append((event.phase, {name for name, place in where.items() if place == "accelerator"}))

    generate_set(models, spec(prompts=PROMPTS[:2], guidance=None), progress=progress)
    assert offload.stages == [TEXT_ENCODERS, ("transformer",), ("autoencoder",)]
    assert {phase: on for phase, on in seen} == {"targets": {"transformer"}, "decode": {"autoencoder"}}


def _levels(a: Any, b: Any) -> int:
    return int(
        (torch.tensor(list(a.tobytes()), dtype=torch.int16) - torch.tensor(list(b.tobytes()), dtype=torch.int16))
        .abs()
        .max()
    )


def test_the_reference_is_plain_fluxs_image_of_its_prompt_alone(dev: FluxModels) -> None:
    shared = generate_set(dev, spec())
    alone = generate_set(dev, spec(prompts=PROMPTS[:1]))
    assert _levels(shared.images[0], alone.images[0]) <= 1
    unshared = generate_set(dev, spec(style=StyleAlignedOptions(strength=0.0)))
    assert _levels(shared.images[1], unshared.images[1]) > 1  # the targets share the reference's style


def test_a_set_of_eight_in_chunks_of_two_and_of_seven_equals_the_one_batch_set(dev: FluxModels) -> None:
    prompts = [f"a toy {word}" for word in ("train", "car", "fox", "boat", "plane", "house", "tree", "cat")]
    whole = generate_set(dev, spec(prompts=prompts))
    for chunk_size in (2, 7):
        chunked = generate_set(dev, spec(prompts=prompts, chunk_size=chunk_size))
        assert max(_levels(a, b) for a, b in zip(chunked.images, whole.images, strict=True)) <= 1
