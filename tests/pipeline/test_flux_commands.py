"""`generate`, `transfer`, `sweep`, `batch`, the app and `convert` take a FLUX.1 model as `--model` with no other
change, through their public paths, on a random FLUX.1 diffusers folder (tiny transformer and T5; CLIP L and the
autoencoder at their real sizes, so the folder is a full-size fixture: these tests are in the slow tier)."""

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from style_aligned.app.making import make_generate_set
from style_aligned.app.studio import Job
from style_aligned.cli import main as cli
from style_aligned.flux.models import FluxModels
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.transfer import TransferSpec, transfer_set
from style_aligned.weights.families import flux_kind
from style_aligned.weights.flux_loading import load_flux
from style_aligned.weights.safetensors_io import SafetensorsReader
from tests.helpers.models import full_size_fixture

PROMPTS = ["a toy train", "a toy car", "a watercolor fox"]


@full_size_fixture()
def flux_models(flux_folder: Path) -> FluxModels:
    return load_flux(flux_folder, dtype=torch.float32)


def sidecar(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "set.json").read_text())


def test_generate_takes_the_folder_as_model(flux_folder: Path, flux_models: FluxModels, tmp_path: Path) -> None:
    prompts = [argument for prompt in PROMPTS[:2] for argument in ("--prompt", prompt)]
    out = tmp_path / "set"
    command = ["generate", "--model", str(flux_folder), *prompts, "--size", "32x16", "--steps", "2", "--seed", "3"]
    cli([*command, "--chunk-size", "1", "--out", str(out)])
    details = sidecar(out)
    assert details["backbone"] == "flux_dev" and details["solver"] == "flow_euler" and details["guidance"] == 3.5
    assert not details["classifier_free_guidance"] and "pending" not in details
    expected = generate_set(flux_models, SetSpec(prompts=PROMPTS[:2], seed=3, steps=2, width=32, height=16))
    for name, image in zip(details["images"], expected.images, strict=True):
        assert Image.open(out / name).size == (32, 16)
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(image))


def test_sweep_and_batch_take_the_folder_as_model(flux_folder: Path, tmp_path: Path) -> None:
    prompts = [argument for prompt in PROMPTS[:2] for argument in ("--prompt", prompt)]
    sweep = tmp_path / "sweep"
    options = ["--model", str(flux_folder), *prompts, "--size", "16", "--steps", "1"]
    cli(["sweep", *options, "--grid", "shared_score_scale=1,0.5", "--out", str(sweep)])
    folders = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert len(folders) == 2 and all(sidecar(folder)["backbone"] == "flux_dev" for folder in folders)
    assert (sweep / "contact-sheet.png").is_file()
    manifest = tmp_path / "sets.jsonl"
    manifest.write_text(
        json.dumps({"id": "toys", "kind": "generate", "prompts": PROMPTS[:2], "width": 16, "steps": 1}) + "\n"
    )
    cli(["batch", str(manifest), "--model", str(flux_folder), "--out", str(tmp_path / "batch")])
    made = sidecar(tmp_path / "batch" / "toys")
    assert made["backbone"] == "flux_dev" and made["steps"] == 1 and "pending" not in made


def test_transfer_inverts_the_image_on_the_folder_and_reuses_the_inversion(
    flux_folder: Path, flux_models: FluxModels, tmp_path: Path
) -> None:
    image = tmp_path / "style.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(image)
    options = ["--model", str(flux_folder), "--prompt", PROMPTS[0], "--size", "32x16", "--steps", "2", "--offset", "0"]
    saved = tmp_path / "inversion.safetensors"
    reference = ["--image", str(image), "--caption", "a red pattern", "--save-trajectory", str(saved)]
    cli(["transfer", *options, *reference, "--out", str(tmp_path / "one")])
    details = sidecar(tmp_path / "one")
    assert details["backbone"] == "flux_dev" and details["solver"] == "flow_euler" and details["offset"] == 0
    assert details["inversion_guidance"] == 1.0 and not details["style"]["share_group_norm"]
    trajectory = ReferenceTrajectory.load(saved)
    spec = TransferSpec(prompts=PROMPTS[:1], steps=2, width=32, height=16, offset=0)
    expected = transfer_set(flux_models, trajectory, spec)
    for name, picture in zip(details["images"], expected.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)), np.asarray(picture))
    cli(["transfer", *options, "--trajectory", str(saved), "--out", str(tmp_path / "two")])
    again = sidecar(tmp_path / "two")
    assert [Image.open(tmp_path / "two" / name).tobytes() for name in again["images"]] == [
        picture.tobytes() for picture in expected.images
    ]


def test_the_app_makes_a_flux_set_with_its_previews(flux_models: FluxModels, tmp_path: Path) -> None:
    job = Job("session")
    previews: list[Image.Image] = []
    update = job.update

    def watched(**changes: Any) -> None:
        if changes.get("preview") is not None:
            previews.append(changes["preview"])
        update(**changes)

    job.update = watched  # type: ignore[method-assign]
    spec = SetSpec(prompts=PROMPTS[:2], steps=2, width=16, chunk_size=1)
    make_generate_set(job, flux_models, spec, model="FLUX.1-tiny", out=tmp_path)
    folder = job.view.folder
    assert folder is not None
    assert sidecar(folder)["backbone"] == "flux_dev" and "pending" not in sidecar(folder)
    assert len(previews) == 2 and previews[0].size[0] > 0


def test_convert_writes_a_folder_that_model_loads_again(
    flux_folder: Path, flux_models: FluxModels, tmp_path: Path
) -> None:
    converted = tmp_path / "converted"
    cli(["convert", "--from", str(flux_folder), "--to", str(converted)])
    gc.collect()
    assert flux_kind(converted) == "flux_dev"  # what --model reads it as
    assert flux_models.clip_text_encoder is not None and flux_models.t5 is not None
    models = {
        "transformer.safetensors": flux_models.transformer,
        "autoencoder.safetensors": flux_models.autoencoder,
        "text_encoder.safetensors": flux_models.clip_text_encoder,
    }
    for name, model in models.items():  # the weights, in bfloat16
        state = model.state_dict()
        with SafetensorsReader(converted / name) as reader:
            assert sorted(reader.keys()) == sorted(state)
            assert all(torch.equal(reader.read(key), state[key].to(torch.bfloat16)) for key in state)
    again = load_flux(converted, dtype=torch.bfloat16)
    assert isinstance(again.transformer, FluxTransformer) and again.transformer.config == flux_models.transformer.config
    assert again.scheduler == flux_models.scheduler and again.t5 is not None and again.t5.max_sequence_length == 512
    t5, expected = again.t5.model.state_dict(), flux_models.t5.model.state_dict()
    assert all(torch.equal(t5[key], expected[key].to(torch.bfloat16)) for key in expected)
