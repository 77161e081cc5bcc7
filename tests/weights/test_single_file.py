"""Single-file checkpoints in the original Stability layout: SD1 here (SDXL in test_convert_sdxl.py), bad files.

The random SD1 pipeline of the session is written as one original-layout file; diffusers' own single-file loading
(an oracle this project does not use) must read it back into models equal to the source, and the project's
conversion of that file must match the source's outputs.
"""

import gc
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from refiners.foundationals.latent_diffusion import StableDiffusion_1

from style_aligned.cli import main as cli
from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES
from style_aligned.weights.loading import load_pipeline
from style_aligned.weights.original_layout import Origin, original_key, pipeline_keys
from style_aligned.weights.safetensors_io import write_safetensors
from tests.helpers.compare import assert_close
from tests.helpers.single_file import assert_equals_folder, oracle_models, write_single_file


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_every_key_has_one_original_name(kind: str) -> None:
    originals: dict[str, list[int]] = {}
    for keys in pipeline_keys(kind).values():
        for key in keys:
            origin = original_key(kind, key)
            originals.setdefault(origin.key, []).append(origin.part)
    assert all(sorted(parts) in ([0], [0, 1, 2]) for parts in originals.values())
    prefixes = {key.split(".")[0] for key in originals}
    assert prefixes == (
        {"model", "first_stage_model", "cond_stage_model"}
        if kind == "sd1"
        else {"model", "first_stage_model", "conditioner"}
    )
    assert len(PIPELINES[kind]) == len(pipeline_keys(kind))


def tiny_original_checkpoint(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Origin]]:
    """An original-layout checkpoint of tiny tensors, each with its own values, and the origin of each diffusers key.

    The shapes only keep what the converters look at: the rank, and the width of OpenCLIP's text projection (2) that
    splits a fused `in_proj` of 6 rows into query, key and value.
    """
    origins: dict[str, Origin] = {}
    checkpoint: dict[str, torch.Tensor] = {}
    for keys in pipeline_keys(kind).values():
        for key in keys:
            origin = origins[key] = original_key(kind, key)
            number = 10.0 * len(checkpoint)
            shapes = {"copy": (1,), "reshape": (1, 1, 1, 1), "transpose": (2, 2), "chunk": (6, 1)}
            shape = shapes[origin.op]
            checkpoint.setdefault(
                origin.key, number + torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
            )
    return checkpoint, origins


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_own_converters_read_the_layout(kind: str) -> None:
    """diffusers' single-file converters (the functions `from_single_file` runs) turn the original keys into the
    diffusers keys that this project maps them to, and the tensors into the same tensors."""
    from diffusers.loaders import single_file_utils as sfu  # type: ignore[import-untyped]

    checkpoint, origins = tiny_original_checkpoint(kind)
    configs = {name.split("_", 1)[1]: ARCHITECTURES[name].configs for name in PIPELINES[kind]}
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, configs["autoencoder"]["vae"]),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(checkpoint),
    }
    if kind == "sdxl":
        converted["text_encoder_2"] = sfu.convert_open_clip_checkpoint(
            None, checkpoint, prefix="conditioner.embedders.1.model."
        )
    for key, origin in origins.items():
        component, _, diffusers_key = key.partition("/")
        tensor = converted[component][diffusers_key]
        assert torch.equal(origin.apply(checkpoint[origin.key], tuple(tensor.shape)), tensor), key


def exit_message(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        cli(arguments)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    *_, last = error.strip().splitlines()  # progress lines may come first; the error is one line
    assert last.startswith("style-aligned: error: ")
    return last


def test_unknown_truncated_and_pickle_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    unknown = tmp_path / "unknown.safetensors"
    write_safetensors(unknown, [("encoder.weight", torch.float32, (2, 2))], lambda _: torch.zeros(2, 2))
    error = exit_message(["convert", "--from", str(unknown), "--to", str(out)], capsys)
    assert "original layout" in error and "model.diffusion_model." in error and "encoder" in error

    half = tmp_path / "half.safetensors"
    write_safetensors(half, [("model.diffusion_model.x", torch.float32, (4,))], lambda _: torch.zeros(4))
    error = exit_message(["convert", "--from", str(half), "--to", str(out)], capsys)
    assert "first_stage_model." in error  # lists what is expected

    truncated = tmp_path / "truncated.safetensors"
    entries = [("model.diffusion_model.x", torch.float32, (1024,)), ("first_stage_model.y", torch.float32, (8,))]
    write_safetensors(truncated, entries, lambda key: torch.zeros(1024 if key.endswith("x") else 8))
    with open(truncated, "r+b") as file:
        file.truncate(truncated.stat().st_size - 100)
    assert "truncated" in exit_message(["convert", "--from", str(truncated), "--to", str(out)], capsys)

    for name in ("model.ckpt", "model.safetensors"):
        checkpoint = tmp_path / "pickles" / name
        checkpoint.parent.mkdir(exist_ok=True)
        checkpoint.write_bytes(pickle.dumps({"state_dict": {}}))
        error = exit_message(["convert", "--from", str(checkpoint), "--to", str(out)], capsys)
        assert "pickle checkpoint" in error and "never loads" in error
        error = exit_message(["generate", "--model", str(checkpoint), "--prompt", "a", "--out", str(out)], capsys)
        assert "pickle checkpoint" in error
    assert not out.exists()  # nothing written


@pytest.fixture(scope="module")
def sd1_single_file(sd1_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("sd1-single") / "sd1-original.safetensors"
    write_single_file(sd1_source["pipeline"], "sd1", path)
    yield path
    path.unlink()


def test_sd1_single_file_is_the_original_layout(sd1_source: dict[str, Any], sd1_single_file: Path) -> None:
    """diffusers' from_single_file reads the file back into the source models, bit for bit."""
    for component, load in oracle_models(sd1_single_file, sd1_source["pipeline"], "sd1").items():
        model = load()
        assert assert_equals_folder(model, sd1_source["pipeline"], component) > 0
        del model
        gc.collect()


def test_sd1_single_file_converts_and_loads(sd1_source: dict[str, Any], sd1_single_file: Path, tmp_path: Path) -> None:
    """Converted by the command line, and loaded on the fly: the models match the source's outputs."""
    destination = tmp_path / "converted"
    cli(["convert", "--from", str(sd1_single_file), "--to", str(destination)])
    inputs, outputs = sd1_source["inputs"], sd1_source["outputs"]
    for source in (destination, sd1_single_file):
        sd = load_pipeline(source)
        assert isinstance(sd, StableDiffusion_1)
        with torch.no_grad():
            sd.unet.set_timestep(inputs["timestep"])
            sd.unet.set_clip_text_embedding(inputs["embedding"])
            assert_close(sd.unet(inputs["x"]), outputs["unet"], 1e-4)
            assert_close(sd.clip_text_encoder[1:](inputs["tokens"]), outputs["text_encoder"])
            assert_close(sd.lda[0](inputs["image"]), outputs["encoded"], 1e-3)
            assert_close(sd.lda[1](inputs["latents"]), outputs["decoded"], 1e-3)
        del sd
        gc.collect()
