"""Whole sets through the Python API and the `generate` command, on a random-weight SD1 pipeline at 64x64 px."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from refiners.foundationals.latent_diffusion import StableDiffusion_1

import style_aligned.pipeline.set_files as set_files
from style_aligned import SharedAttentionAdapter
from style_aligned.cli import main as cli
from style_aligned.options import StyleAlignedOptions, option_fields
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.spec import SetSpec

PROMPTS = ["a toy train", "a toy airplane", "a toy bicycle", "a toy car"]


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_chunk_size_does_not_change_the_set(sd: StableDiffusion_1) -> None:
    events: list[ProgressEvent] = []
    solver = sd.solver
    spec = SetSpec(prompts=PROMPTS, width=64, height=64, steps=2, style=StyleAlignedOptions(share_group_norm=True))
    whole = generate_set(sd, spec, progress=events.append)
    assert [image.size for image in whole.images] == [(64, 64)] * 4 and whole.prompts == PROMPTS
    assert whole.spec.guidance == 7.5 and sd.solver is solver
    assert not list(sd.unet.layers(SharedAttentionAdapter))  # ejected
    assert [(e.phase, e.done) for e in events] == [  # one U-Net call per step: the reference rides with the targets
        ("targets", 1),
        ("targets", 2),
        *[("decode", 3 + i) for i in range(4)],
    ]
    assert {e.total for e in events} == {6}
    for chunk_size in (1, 2):
        chunked = generate_set(sd, SetSpec(**{**spec.__dict__, "chunk_size": chunk_size}))
        assert np.abs(pixels(chunked.images) - pixels(whole.images)).max() <= 1


def test_reference_prompt_and_plain_generation_differ_only_by_sharing(sd: StableDiffusion_1) -> None:
    shared = generate_set(sd, SetSpec(prompts=PROMPTS[1:3], reference_prompt=PROMPTS[0], width=64, steps=2))
    assert shared.prompts == PROMPTS[:3] and len(shared.images) == 3
    unshared = generate_set(
        sd, SetSpec(prompts=PROMPTS[:3], width=64, steps=2, style=StyleAlignedOptions(only_self_level=1.0))
    )
    difference = np.abs(pixels(shared.images) - pixels(unshared.images)).reshape(3, -1).max(axis=1)
    assert difference[0] == 0 and difference[1:].min() > 0  # the reference is unchanged, the targets move


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda: SetSpec(prompts=[]), "at least one prompt"),
        (lambda: SetSpec(prompts=PROMPTS, width=60), "multiples of 8"),
        (lambda: SetSpec(prompts=PROMPTS, steps=0), "steps must be"),
        (lambda: SetSpec(prompts=PROMPTS, chunk_size=0), "chunk_size must be"),
        (lambda: SetSpec(prompts=PROMPTS, style=StyleAlignedOptions(only_self_level=2.0)), "only_self_level"),
    ],
)
def test_bad_settings_are_clear_errors(sd: StableDiffusion_1, make_spec: Callable[[], SetSpec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_set(sd, make_spec())
    assert not list(sd.unet.layers(SharedAttentionAdapter))


def generate_command(model: Path, out: Path, *extra: str) -> list[str]:
    arguments = ["generate", "--model", str(model), "--out", str(out), "--size", "64x64", "--steps", "2"]
    return arguments + [argument for prompt in PROMPTS[:3] for argument in ("--prompt", prompt)] + list(extra)


def test_generate_command_writes_images_grid_and_sidecar(
    sd1_converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set"
    cli(generate_command(sd1_converted, out, "--chunk-size", "1", "--seed", "7", "--shared-score-shift", "0.69"))
    sidecar: dict[str, Any] = json.loads((out / "set.json").read_text())
    assert sidecar["command"] == "generate" and sidecar["seed"] == 7 and sidecar["chunk_size"] == 1
    assert sidecar["image_prompts"] == PROMPTS[:3]
    assert (
        sidecar["style"]
        == StyleAlignedOptions(shared_score_shift=0.69, share_group_norm=True).resolved("sd1").to_dict()
    )
    assert sidecar["width"] == sidecar["height"] == 64 and sidecar["guidance"] == 7.5
    assert sidecar["images"][0].startswith("00-reference-a-toy-train")
    for name in sidecar["images"]:
        with Image.open(out / name) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 64 and grid.height > 64
    assert "step 2/2" in capsys.readouterr().err  # the progress bar


def option_flags(style: dict[str, Any]) -> list[str]:
    """The command-line flags of a sidecar's StyleAligned options."""
    flags: list[str] = []
    fields = {option.name: option for option in option_fields()}
    for name, value in style.items():
        flag = fields[name].flag
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, str):
            flags += [flag, value]
        elif value is not None:
            flags += [flag, repr(value)]
    return flags


def test_sidecar_options_reproduce_the_set(sd1_converted: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    cli(generate_command(sd1_converted, first, "--seed", "3"))
    sidecar: dict[str, Any] = json.loads((first / "set.json").read_text())
    assert sidecar["style"]["share_group_norm"] is True  # the SD1 example of the reference shares GroupNorm
    assert set(sidecar["style"]) == set(StyleAlignedOptions.names())
    StyleAlignedOptions.from_dict(sidecar["style"])  # reads back
    with pytest.raises(ValueError, match="unknown StyleAligned option 'adain_everything'"):
        StyleAlignedOptions.from_dict({**sidecar["style"], "adain_everything": True})
    second = tmp_path / "second"
    cli(generate_command(sd1_converted, second, "--seed", "3", *option_flags(sidecar["style"])))
    for name in [*sidecar["images"], "grid.png"]:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_interrupted_generate_leaves_complete_files_only(
    sd1_converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "set"
    written: list[Path] = []
    save_png = set_files.save_png

    def interrupted_after_one(image: Image.Image, path: Path) -> None:
        if written:
            raise KeyboardInterrupt
        save_png(image, path)
        written.append(path)

    monkeypatch.setattr(set_files, "save_png", interrupted_after_one)
    with pytest.raises(SystemExit) as exit_info:
        cli(generate_command(sd1_converted, out))
    assert exit_info.value.code == 130
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted(["set.json", written[0].name])  # no partial file
    with Image.open(written[0]) as image:
        image.load()
