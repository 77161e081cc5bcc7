"""Conversion of random-weight diffusers folders (full-size configurations) to Refiners, and loading them."""

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from refiners.foundationals.latent_diffusion import SD1ControlnetAdapter, SD1UNet, StableDiffusion_1

from style_aligned.cli import main as cli
from style_aligned.weights.architectures import ARCHITECTURES
from style_aligned.weights.convert import ModelSource, convert
from style_aligned.weights.loading import converted_file_kind, load_model, load_pipeline
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError, write_safetensors
from tests.helpers import diffusers_models as dm
from tests.helpers.compare import assert_close


def test_sd1_pipeline_converts_by_command_and_matches_diffusers(
    sd1_source: dict[str, Any], sd1_converted: Path
) -> None:
    files = sorted(p.name for p in sd1_converted.iterdir())
    assert files == ["autoencoder.safetensors", "text_encoder.safetensors", "unet.safetensors"]
    with SafetensorsReader(sd1_converted / "unet.safetensors") as reader:
        assert reader.metadata["model"] == "sd1_unet" and reader.metadata["dtype"] == "float32"
        assert reader.metadata["source"] == str(sd1_source["pipeline"].resolve())

    sd = load_pipeline(sd1_converted)
    assert isinstance(sd, StableDiffusion_1)
    inputs, outputs = sd1_source["inputs"], sd1_source["outputs"]
    with torch.no_grad():
        sd.unet.set_timestep(inputs["timestep"])
        sd.unet.set_clip_text_embedding(inputs["embedding"])
        assert_close(sd.unet(inputs["x"]), outputs["unet"])
        assert_close(sd.clip_text_encoder[1:](inputs["tokens"]), outputs["text_encoder"])
        assert_close(sd.lda[0](inputs["image"]), outputs["encoded"])
        assert_close(sd.lda[1](inputs["latents"]), outputs["decoded"])


def test_pipeline_loads_straight_from_diffusers_and_from_cache(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    inputs, outputs = sd1_source["inputs"], sd1_source["outputs"]
    for round in range(3):
        cache = tmp_path / "cache" if round else None
        sd = load_pipeline(sd1_source["pipeline"], cache_dir=cache)
        with torch.no_grad():
            sd.unet.set_timestep(inputs["timestep"])
            sd.unet.set_clip_text_embedding(inputs["embedding"])
            assert_close(sd.unet(inputs["x"]), outputs["unet"])
        del sd
        gc.collect()  # one pipeline in memory at a time
        if round == 1:
            (cached,) = (tmp_path / "cache").iterdir()
            stamp = (cached / "unet.safetensors").stat().st_mtime_ns
    assert (cached / "unet.safetensors").stat().st_mtime_ns == stamp  # the third load reused the cache
    shutil.rmtree(tmp_path / "cache")


def controlnet_residuals(controlnet_file: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.device("meta"):
        unet = SD1UNet(in_channels=4)
    adapter = SD1ControlnetAdapter(unet, name="depth")
    adapter.controlnet.load_state_dict(load_model(controlnet_file, kind="sd1_controlnet").state_dict(), assign=True)
    adapter.inject()
    adapter.set_controlnet_condition(inputs["condition"])
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["embedding"])
    with torch.no_grad():
        adapter.controlnet(inputs["x"])
    return list(unet.use_context("unet")["residuals"])


@pytest.mark.parametrize("half", [False, True])
def test_sd1_controlnet_converts_and_matches_diffusers(sd1_source: dict[str, Any], tmp_path: Path, half: bool) -> None:
    (file,) = convert(sd1_source["controlnet"], tmp_path, half=half)
    assert file.name == "controlnet.safetensors"
    with SafetensorsReader(file) as reader:
        assert reader.metadata["dtype"] == ("float16" if half else "float32")
        assert {reader.tensors[key].dtype for key in reader.keys()} == {torch.float16 if half else torch.float32}
    residuals = controlnet_residuals(file, sd1_source["inputs"])
    expected = sd1_source["outputs"]["controlnet"]
    assert len(residuals) == len(expected) == 13
    for actual, reference in zip(residuals, expected, strict=True):
        assert_close(actual, reference, tolerance=1e-2 if half else 1e-4)
    file.unlink()


def link_pipeline(source: Path, destination: Path, kind: str, folders: dict[str, Path]) -> Path:
    dm.write_model_index(destination, kind)
    for name, folder in folders.items():
        (destination / name).symlink_to(folder, target_is_directory=True)
    return destination


def copy_folder(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def refused(source: Path, destination: Path, *patterns: str) -> str:
    """Convert, expecting an error whose message holds every pattern, and check that nothing was written."""
    with pytest.raises(WeightsError) as error:
        convert(source, destination)
    message = str(error.value)
    for pattern in patterns:
        assert pattern in message, message
    assert not destination.exists()
    return message


def test_missing_subfolder_is_refused(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    pipeline = sd1_source["pipeline"]
    source = link_pipeline(
        pipeline, tmp_path / "src", "sd1", {"unet": pipeline / "unet", "text_encoder": pipeline / "text_encoder"}
    )
    refused(source, tmp_path / "out", "vae", "is missing", "SD1 autoencoder")


def test_truncated_and_corrupt_files_are_refused(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    pipeline = sd1_source["pipeline"]
    for damage, pattern in (("truncate", "is truncated"), ("corrupt", "not a valid safetensors file")):
        vae = copy_folder(pipeline / "vae", tmp_path / f"vae-{damage}")
        weights = vae / "diffusion_pytorch_model.safetensors"
        with open(weights, "r+b") as file:
            if damage == "truncate":
                file.truncate(weights.stat().st_size - 4096)
            else:
                file.seek(8)
                file.write(b"\x00garbage{")
        source = link_pipeline(
            pipeline,
            tmp_path / f"src-{damage}",
            "sd1",
            {"unet": pipeline / "unet", "text_encoder": pipeline / "text_encoder", "vae": vae},
        )
        refused(source, tmp_path / f"out-{damage}", pattern, "vae/diffusion_pytorch_model.safetensors")


def test_wrong_model_is_refused(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    pipeline = sd1_source["pipeline"]
    # An SD1 U-Net in an SDXL pipeline: its config says so.
    source = link_pipeline(pipeline, tmp_path / "sdxl", "sdxl", {"unet": pipeline / "unet"})
    refused(
        source, tmp_path / "out", "does not describe the SDXL U-Net", "cross_attention_dim", "looks like the SD1 U-Net"
    )
    # The same weights under an SDXL config: the keys and shapes say so.
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **dm.CONFIGS["sdxl_unet"]["unet"]})
    )
    (unet / "diffusion_pytorch_model.safetensors").symlink_to(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    refused(unet, tmp_path / "out2", "do not hold the weights of the SDXL U-Net", "missing keys", "unexpected keys")


def rewrite(source: Path, destination: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Copy a safetensors file, adding (a tensor) or removing (None) some keys."""
    with SafetensorsReader(source) as reader:
        tensors = {key: reader.read(key) for key in reader.keys() if key not in edit}
    tensors |= {key: tensor for key, tensor in edit.items() if tensor is not None}
    entries = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
    write_safetensors(destination, entries, tensors.__getitem__)


def test_extra_and_missing_keys_are_refused(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    vae = sd1_source["pipeline"] / "vae"
    weights = vae / "diffusion_pytorch_model.safetensors"
    for label, edit in (
        ("unexpected keys (1): decoder.extra.weight", {"decoder.extra.weight": torch.zeros(3)}),
        ("missing keys (1): decoder.conv_out.bias", {"decoder.conv_out.bias": None}),
    ):
        folder = tmp_path / label.split()[0]
        folder.mkdir()
        shutil.copy(vae / "config.json", folder / "config.json")
        rewrite(weights, folder / "diffusion_pytorch_model.safetensors", edit)
        with pytest.raises(WeightsError, match=label.replace("(", r"\(").replace(")", r"\)")):
            ModelSource(ARCHITECTURES["sd1_autoencoder"], {"vae": folder})
        source = link_pipeline(
            sd1_source["pipeline"],
            tmp_path / f"src-{folder.name}",
            "sd1",
            {
                "unet": sd1_source["pipeline"] / "unet",
                "text_encoder": sd1_source["pipeline"] / "text_encoder",
                "vae": folder,
            },
        )
        refused(source, tmp_path / f"out-{folder.name}", label)


def test_pickle_weights_are_refused_with_a_way_out(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    controlnet = tmp_path / "controlnet"
    controlnet.mkdir()
    shutil.copy(sd1_source["controlnet"] / "config.json", controlnet / "config.json")
    (controlnet / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch.save zip archive")
    message = refused(controlnet, tmp_path / "out", "pickle checkpoint", "never loads", "safetensors.torch")
    assert "weights_only=True" in message
    # A pickle file named .safetensors is recognised too, and never unpickled.
    (controlnet / "diffusion_pytorch_model.bin").rename(controlnet / "diffusion_pytorch_model.safetensors")
    refused(controlnet, tmp_path / "out", "pickle checkpoint")


def test_existing_files_are_kept_and_failures_leave_nothing(
    sd1_source: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "controlnet.safetensors").write_text("mine")
    with pytest.raises(WeightsError, match="already exist"):
        convert(sd1_source["controlnet"], destination)
    assert (destination / "controlnet.safetensors").read_text() == "mine"

    calls = 0
    original = ModelSource.read

    def failing_read(self: ModelSource, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 50:
            raise KeyboardInterrupt  # as if interrupted in the middle of the file
        return original(self, key, dtype)

    monkeypatch.setattr(ModelSource, "read", failing_read)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        convert(sd1_source["pipeline"], fresh)
    assert not fresh.exists()
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        convert(sd1_source["controlnet"], destination, overwrite=True)
    assert [p.name for p in destination.iterdir()] == ["controlnet.safetensors"]
    assert (destination / "controlnet.safetensors").read_text() == "mine"


def test_cli_reports_errors_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "--from", str(tmp_path / "nowhere"), "--to", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "is neither a folder, a checkpoint file nor a Hugging Face Hub repo id" in capsys.readouterr().err


def test_loading_a_file_of_another_kind_is_refused(sd1_converted: Path, tmp_path: Path) -> None:
    file = sd1_converted / "autoencoder.safetensors"
    assert converted_file_kind(file) == "sd1_autoencoder"
    with pytest.raises(WeightsError, match="holds the weights of the SD1 autoencoder, not of the SD1 U-Net"):
        load_model(file, kind="sd1_unet")
    with pytest.raises(WeightsError, match="neither converted weights"):
        load_pipeline(tmp_path)


def test_text_encoder_keys_with_or_without_text_model_prefix(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    """Published checkpoints write `text_model.` before CLIP text keys; transformers 5 saves without it."""
    pipeline = sd1_source["pipeline"]
    text_encoder = tmp_path / "text_encoder"
    text_encoder.mkdir()
    shutil.copy(pipeline / "text_encoder" / "config.json", text_encoder / "config.json")
    with SafetensorsReader(pipeline / "text_encoder" / "model.safetensors") as reader:
        tensors = {
            f"text_model.{key}".replace("text_model.text_model.", "text_model."): reader.read(key)
            for key in reader.keys()
        }
    assert all(key.startswith("text_model.") for key in tensors)
    entries = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
    write_safetensors(text_encoder / "model.safetensors", entries, tensors.__getitem__)
    source = link_pipeline(
        pipeline,
        tmp_path / "src",
        "sd1",
        {"unet": pipeline / "unet", "text_encoder": text_encoder, "vae": pipeline / "vae"},
    )
    encoder = load_pipeline(source).clip_text_encoder  # converted on the fly
    with torch.no_grad():
        assert_close(encoder[1:](sd1_source["inputs"]["tokens"]), sd1_source["outputs"]["text_encoder"])
