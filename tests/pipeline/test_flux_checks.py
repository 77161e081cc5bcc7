"""What FLUX.1 does not take is a one-line error (exit status 2) before any model is read, the model told FLUX.1
from its small files only."""

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import style_aligned.weights.flux_loading as flux_loading
import style_aligned.weights.loading as loading
from style_aligned.cli import main as cli
from style_aligned.weights.families import flux_kind
from tests.helpers.flux import TINY, diffusers_transformer

PROMPTS = ["--prompt", "a toy train", "--prompt", "a toy car"]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is read."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a model was read")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(flux_loading, "load_flux", refuse)


def flux_index(folder: Path, *, guidance: bool = True) -> Path:
    """The small files that tell a FLUX.1 diffusers folder (no weights)."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": guidance}))
    return folder


def error_of(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        cli(arguments)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("\n") == 1, error
    return error


def test_flux_is_told_from_small_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    assert flux_kind(flux_index(tmp_path / "dev")) == "flux_dev"
    assert flux_kind(flux_index(tmp_path / "schnell", guidance=False)) == "flux_schnell"
    state = diffusers_transformer(TINY).state_dict()
    save_file(state, str(tmp_path / "flux1-tiny.safetensors"))
    assert flux_kind(tmp_path / "flux1-tiny.safetensors") == "flux_dev"
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert flux_kind(tmp_path / "sd") is None and flux_kind(tmp_path / "nowhere") is None


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--negative-prompt", "blurry"], "no negative prompt"),
        (["--size", "40"], "multiples of 16 pixels for FLUX.1"),
        (["--solver", "dpm"], "its own solver, flow_euler"),
        (["--share-group-norm"], "share_group_norm has no meaning on FLUX.1"),
        (["--lora", "style.safetensors"], "LoRAs"),
        (["--controlnet", "depth.safetensors", "--control", "depth.png"], "ControlNets"),
        (["--timestep-spacing", "trailing"], "timestep_spacing"),
    ],
)
def test_what_flux_does_not_take_fails_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    model = flux_index(tmp_path / "FLUX.1-dev")
    arguments = ["generate", "--model", str(model), *PROMPTS, *options, "--out", str(tmp_path / "set")]
    assert message in error_of(arguments, capsys)
    assert not (tmp_path / "set").exists()


@pytest.mark.usefixtures("no_model")
def test_schnell_guidance_offload_transfer_and_batch_lines_fail_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schnell = flux_index(tmp_path / "FLUX.1-schnell", guidance=False)
    out = ["--out", str(tmp_path / "set")]
    error = error_of(["generate", "--model", str(schnell), *PROMPTS, "--guidance", "3", *out], capsys)
    assert "[schnell] has no guidance embedding" in error
    error = error_of(["generate", "--model", str(tmp_path / "sd"), *PROMPTS, "--offload", *out], capsys)
    assert "--offload is for FLUX.1 models" in error
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    transfer = ["transfer", "--model", str(schnell), "--image", str(image), "--caption", "a", *PROMPTS, *out]
    assert "takes no inversion guidance" in error_of([*transfer, "--inversion-guidance", "2"], capsys)
    assert "its own solver, flow_euler, not ddim" in error_of([*transfer, "--solver", "ddim"], capsys)
    manifest = tmp_path / "sets.jsonl"
    manifest.write_text(
        json.dumps({"id": "toys", "kind": "generate", "prompts": ["a", "b"], "negative_prompt": "x"}) + "\n"
    )
    error = error_of(["batch", str(manifest), "--model", str(schnell), "--out", str(tmp_path / "batch")], capsys)
    assert "no negative prompt" in error


@pytest.mark.usefixtures("no_model")
def test_a_sweep_setting_that_flux_does_not_take_fails_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = flux_index(tmp_path / "FLUX.1-dev")
    grid = ["--grid", "share_group_norm=false,true"]
    error = error_of(["sweep", "--model", str(model), *PROMPTS, *grid, "--out", str(tmp_path / "sweep")], capsys)
    assert "share_group_norm has no meaning on FLUX.1" in error
    assert not (tmp_path / "sweep").exists()
