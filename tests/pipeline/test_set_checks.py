"""Options checked before any model is read, and output folders: a finished set is never mixed with another."""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

import style_aligned.weights.loading as loading
from style_aligned.cli import main as cli

PROMPTS = ["--prompt", "a toy train", "--prompt", "a toy car"]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is read."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a model was read")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def error_of(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        cli(arguments)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("\n") == 1, error
    return error


@pytest.mark.usefixtures("no_model")
def test_bad_size_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    error = error_of(["generate", *PROMPTS, "--size", "1000x33", "--out", str(tmp_path / "set")], capsys)
    assert time.perf_counter() - start < 2  # after the imports; the whole process: docs/benchmarks.md
    assert "multiples of 8" in error and "1000x33" in error
    assert not (tmp_path / "set").exists()


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("generate", ["--guidance", "-1"], "guidance scale must be a number >= 0"),
        ("generate", ["--steps", "0"], "steps must be at least 1"),
        ("generate", ["--chunk-size", "0"], "chunk_size must be at least 1"),
        ("generate", ["--shared-score-scale", "0"], "shared_score_scale must be"),
        ("generate", ["--only-self-level", "1.5"], "only_self_level must be in [0, 1]"),
        ("generate", ["--style-strength", "1.2"], "strength must be a number in [0, 1], got 1.2"),
        ("generate", ["--attention-mode", "swap", "--style-strength", "0.5"], "strength only apply with"),
        ("generate", ["--controlnet", "cn.safetensors", "--control", "missing.png"], "no such image: missing.png"),
        ("generate", ["--lora", "missing.safetensors:0.5"], "missing.safetensors does not exist"),
        ("transfer", ["--image", "missing.png", "--caption", "a photo"], "reference image missing.png does not exist"),
        ("transfer", ["--guidance", "-2", "--image", "missing.png", "--caption", "a"], "guidance scale"),
        ("sweep", ["--grid", "shared_score_shift=0,1", "--size", "64x60"], "multiples of 8"),
        ("sweep", ["--grid", "shared_score_shift=0,1", "--clip", "not a model"], "neither a folder nor a Hub repo"),
        ("sweep", ["--grid", "style-strength=0,1.5"], "strength must be a number in [0, 1], got 1.5"),
        ("sweep", ["--grid", "strength=0,1", "--style-strength", "0.5"], "strength given both"),
    ],
)
def test_options_are_checked_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, options: list[str], message: str
) -> None:
    assert message in error_of([command, *PROMPTS, *options, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_model")
def test_a_folder_that_is_not_a_set_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not mine")
    assert "--overwrite" in error_of(["generate", *PROMPTS, "--out", str(out)], capsys)
    error = error_of(["generate", *PROMPTS, "--out", str(out), "--overwrite"], capsys)
    assert "holds no set written by style-aligned" in error
    assert [path.name for path in out.iterdir()] == ["holiday.jpg"]


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_a_finished_set_is_kept_or_replaced_whole(
    sd1_converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "set"
    common = ["generate", "--model", str(sd1_converted), "--size", "64x64", "--steps", "2", "--out", str(out)]
    cli([*common, *PROMPTS, "--prompt", "a toy airplane"])
    before = digests(out)
    assert len(before) == 5  # three images, the grid and set.json
    capsys.readouterr()

    with monkeypatch.context() as patch:  # a second run into the finished set: refused before any model is read
        patch.setattr(loading, "load_pipeline", lambda *_, **__: pytest.fail("a model was read"))
        error = error_of([*common, "--prompt", "a toy boat", "--prompt", "a toy truck"], capsys)
    assert "holds another set" in error and "--overwrite" in error
    assert digests(out) == before  # byte for byte as it was

    cli([*common, "--prompt", "a toy boat", "--prompt", "a toy truck", "--seed", "3", "--overwrite"])
    sidecar = json.loads((out / "set.json").read_text())
    assert sidecar["image_prompts"] == ["a toy boat", "a toy truck"] and sidecar["seed"] == 3
    assert sorted(path.name for path in out.iterdir()) == sorted([*sidecar["images"], "grid.png", "set.json"])
    assert not list(tmp_path.glob(".*"))  # nothing left beside it
