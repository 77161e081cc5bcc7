"""A plain FLUX.1 image of the set pipeline equals diffusers' `FluxPipeline`'s from the same seed, text, steps, size
and guidance, on a random FLUX.1 diffusers folder (tiny transformer and T5; CLIP L and the autoencoder at their real
sizes)."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.flux_loading import load_flux
from tests.helpers.flux_pipeline import write_flux_pipeline

PROMPTS = ["a toy train", "a toy car", "a watercolor fox"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux") / "FLUX.1-tiny"
    write_flux_pipeline(folder)
    return folder


@torch.no_grad()
def flux_pipeline_image(folder: Path, prompt: str, *, seed: int, steps: int, size: int) -> np.ndarray:
    """diffusers' `FluxPipeline` on the folder's models, with CLIP L's pooled output of the prompt's CLIP tokens (the
    folder's CLIP tokenizer files are stand-ins) and T5's embedding as the pipeline computes it."""
    from diffusers import (  # type: ignore[import-untyped]
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from refiners.foundationals.clip.tokenizer import CLIPTokenizer
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel  # type: ignore[import-untyped]

    clip: Any = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    pooled = clip(CLIPTokenizer()(prompt)).pooler_output
    del clip
    pipeline: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer").eval(),
    )
    embedding = pipeline._get_t5_prompt_embeds(
        prompt=prompt, max_sequence_length=512, device=torch.device("cpu"), dtype=torch.float32
    )
    image = pipeline(
        prompt_embeds=embedding,
        pooled_prompt_embeds=pooled,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=512,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_a_plain_image_equals_flux_pipelines_from_the_same_seed(flux_folder: Path) -> None:
    expected = flux_pipeline_image(flux_folder, PROMPTS[2], seed=7, steps=4, size=64)
    models = load_flux(flux_folder, dtype=torch.float32)
    made = generate_set(models, SetSpec(prompts=[PROMPTS[2]], seed=7, steps=4, width=64))
    actual = np.asarray(made.images[0], dtype=np.int16)
    assert actual.shape == expected.shape == (64, 64, 3)
    assert np.abs(actual - expected).max() <= 2
    assert expected.std() > 5  # a real image, not a flat one
