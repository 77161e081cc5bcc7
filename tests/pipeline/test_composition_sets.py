"""Whole sets with a ControlNet, a LoRA and an IP-Adapter, through the Python API and the command line (random SD1)."""

import gc
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from refiners.fluxion.adapters.lora import LoraAdapter
from refiners.foundationals.clip.image_encoder import CLIPImageEncoderH
from refiners.foundationals.latent_diffusion import SD1IPAdapter, StableDiffusion_1
from safetensors.torch import save_file

from style_aligned.cli import main as cli
from style_aligned.pipeline.composition import ControlSpec, IPAdapterSpec, LoraSpec
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.lora import LoraError
from style_aligned.weights.random_weights import build_random

PROMPTS = ["a house", "a tree", "a boat"]  # the reference, then two targets


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


@pytest.fixture(scope="module")
def files(sd1_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted ControlNet, a kohya LoRA file and control images."""
    folder = tmp_path_factory.mktemp("extras")
    cli(["convert", "--from", str(sd1_source["controlnet"]), "--to", str(folder)])
    generator = torch.Generator().manual_seed(3)
    lora: dict[str, torch.Tensor] = {}
    for block, channels in (("down_blocks_1_attentions_0", 640), ("mid_block_attentions_0", 1280)):
        key = f"lora_unet_{block}_transformer_blocks_0_attn1_to_v"
        lora[f"{key}.lora_down.weight"] = torch.randn(4, channels, generator=generator)
        lora[f"{key}.lora_up.weight"] = torch.randn(channels, 4, generator=generator)
        lora[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(lora, folder / "lora.safetensors")
    paths = {"controlnet": folder / "controlnet.safetensors", "lora": folder / "lora.safetensors"}
    rng = np.random.default_rng(4)
    for index in range(3):
        paths[f"control_{index}"] = folder / f"control_{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths[f"control_{index}"])
    return paths


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def differs(first: np.ndarray, second: np.ndarray) -> list[bool]:
    return [bool(np.abs(a - b).max() > 0) for a, b in zip(first, second, strict=True)]


def state(sd: StableDiffusion_1) -> dict[str, tuple[int, int, int]]:
    """Each U-Net tensor's identity, storage and version: unchanged if the same tensors remain and none was written."""
    return {
        key: (id(value), value.data_ptr(), value._version) for key, value in sd.unet.state_dict(keep_vars=True).items()
    }  # noqa: SLF001


SPEC = SetSpec(prompts=PROMPTS, width=64, steps=2, seed=1)


@pytest.fixture(scope="module")
def plain(sd: StableDiffusion_1) -> np.ndarray:
    return pixels(generate_set(sd, SPEC).images)


@pytest.fixture(scope="module")
def controlled(sd: StableDiffusion_1, files: dict[str, Path]) -> list[np.ndarray]:
    """The set with one control image for all targets, then with one per target (the first target's unchanged)."""
    before = state(sd)
    sets: list[np.ndarray] = []
    for images in ([files["control_0"]], [files["control_0"], files["control_1"]]):
        control = ControlSpec(files["controlnet"], images=list(images), scale=1.0)
        sets.append(pixels(generate_set(sd, replace(SPEC, controls=[control])).images))
    assert state(sd) == before
    return sets


def test_reference_is_held_fixed_across_control_images(plain: np.ndarray, controlled: list[np.ndarray]) -> None:
    for result in controlled:
        assert differs(result, plain) == [False, True, True]  # the reference is uncontrolled, the targets follow
    assert differs(controlled[0], controlled[1]) == [False, False, True]  # the first target's control is the same


def test_bad_extras_leave_the_model_as_it_was(sd: StableDiffusion_1, files: dict[str, Path], tmp_path: Path) -> None:
    before = state(sd)
    too_many = ControlSpec(files["controlnet"], images=[files["control_0"]] * 3)
    with pytest.raises(ValueError, match="one control image for all targets or one per target"):
        generate_set(sd, SetSpec(prompts=PROMPTS, width=64, steps=1, controls=[too_many]))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 320)}, unknown)
    with pytest.raises(LoraError, match="nowhere"):
        generate_set(
            sd,
            SetSpec(
                prompts=PROMPTS,
                width=64,
                steps=1,
                controls=[ControlSpec(files["controlnet"], [files["control_0"]])],
                loras=[LoraSpec(files["lora"]), LoraSpec(unknown)],
            ),
        )
    assert not list(sd.unet.layers(LoraAdapter))
    assert state(sd) == before


@pytest.fixture
def ip_adapter_files(sd: StableDiffusion_1, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A random CLIP ViT-H image encoder and SD1 IP-Adapter, saved in Refiners' layout."""
    encoder = build_random(CLIPImageEncoderH, seed=5)
    adapter = SD1IPAdapter(sd.unet, clip_image_encoder=encoder)  # built, never injected: its random weights only
    weights = {f"image_proj.{key}": value for key, value in adapter.image_proj.state_dict().items()}
    for index, cross_attention in enumerate(adapter.sub_adapters):
        weights[f"ip_adapter.{index:03d}.to_k_ip.weight"] = cross_attention.image_key_projection.weight * 20
        weights[f"ip_adapter.{index:03d}.to_v_ip.weight"] = cross_attention.image_value_projection.weight * 20
    paths = {"weights": tmp_path / "ip_adapter.safetensors", "encoder": tmp_path / "image_encoder.safetensors"}
    save_file({key: value.contiguous() for key, value in weights.items()}, paths["weights"])
    save_file(encoder.state_dict(), paths["encoder"])
    del encoder, adapter
    gc.collect()  # Refiners models hold reference cycles
    yield paths
    for path in paths.values():
        path.unlink()


def test_ip_adapter_conditions_the_whole_set_and_is_removed(
    sd: StableDiffusion_1, plain: np.ndarray, files: dict[str, Path], ip_adapter_files: dict[str, Path]
) -> None:
    before = state(sd)
    ip_adapter = IPAdapterSpec(
        weights=ip_adapter_files["weights"],
        image_encoder=ip_adapter_files["encoder"],
        image=files["control_0"],
        scale=1,
    )
    prompted = pixels(generate_set(sd, replace(SPEC, ip_adapter=ip_adapter)).images)
    assert differs(prompted, plain) == [True, True, True]
    wrong = IPAdapterSpec(weights=files["lora"], image_encoder=ip_adapter_files["encoder"], image=files["control_0"])
    with pytest.raises(ValueError, match="not an IP-Adapter for this model"):
        generate_set(sd, replace(SPEC, ip_adapter=wrong, loras=[LoraSpec(files["lora"])]))
    assert state(sd) == before


def test_generate_command_with_a_control_image_and_a_lora(
    sd1_converted: Path, files: dict[str, Path], plain: np.ndarray, controlled: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "set"
    arguments = ["generate", "--model", str(sd1_converted), "--out", str(out), "--size", "64x64", "--steps", "2"]
    arguments += ["--seed", "1", "--controlnet", str(files["controlnet"]), "--control", str(files["control_0"])]
    cli(
        arguments
        + [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]
        + ["--lora", f"{files['lora']}:0.8"]
    )
    sidecar = json.loads((out / "set.json").read_text())
    assert sidecar["loras"] == [{"path": str(files["lora"]), "scale": 0.8}]
    assert sidecar["controls"] == [
        {"weights": str(files["controlnet"]), "images": [str(files["control_0"])], "scale": 1.0}
    ]
    images = [Image.open(out / name).convert("RGB") for name in sidecar["images"]]
    assert [image.size for image in images] == [(64, 64)] * 3 and (out / "grid.png").is_file()
    assert differs(pixels(images), plain) == [True, True, True]
    assert differs(pixels(images), controlled[0]) == [
        True,
        True,
        True,
    ]  # the LoRA changes every image, the reference too
