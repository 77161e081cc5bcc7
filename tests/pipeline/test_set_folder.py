"""The one writer of a set on disk: images written as they come, `set.json` listing those still to come, a set killed
part way completed by the same command again, equal to an uninterrupted run, and a finished set left alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import style_aligned.cli.options as command_options
from style_aligned.cli import main as cli
from style_aligned.pipeline.set_files import SetFolder, folder_state, make_set, set_request, sidecar
from style_aligned.pipeline.spec import GeneratedSet, SetSpec
from style_aligned.pipeline.unet_backbone import UNetBackbone

PROMPTS = ["a toy train", "a toy car", "a toy boat"]
ROOT = Path(__file__).parents[2]


def details_of(spec: SetSpec, **inputs: Any) -> dict[str, Any]:
    return sidecar("generate", spec, spec.image_prompts(), request=set_request("generate", spec, **inputs))


def coloured(images: list[int] | None, progress: Any) -> GeneratedSet:
    """Stands in for `generate_set`: image i is a flat colour, reported as decoded."""
    from style_aligned.pipeline.progress import ProgressEvent

    chosen = list(range(3)) if images is None else images
    made = [Image.new("RGB", (8, 8), (40 * index, 0, 0)) for index in chosen]
    for number, (index, image) in enumerate(zip(chosen, made, strict=True), start=1):
        progress(
            ProgressEvent.decoded(
                done=number, total=len(chosen), number=number, count=len(chosen), index=index, image=image
            )
        )
    return GeneratedSet(images=made, prompts=[PROMPTS[i] for i in chosen], spec=SetSpec(prompts=PROMPTS))


def test_a_set_appears_image_by_image_and_says_what_is_still_to_come(tmp_path: Path) -> None:
    spec = SetSpec(prompts=PROMPTS, chunk_size=1)
    out = tmp_path / "set"
    folder = SetFolder(out, details_of(spec), title="t")
    assert folder.missing == [0, 1, 2] and not folder.complete
    folder.start()
    assert json.loads((out / "set.json").read_text())["pending"] == folder.names
    folder.add(1, Image.new("RGB", (8, 8)))
    assert json.loads((out / "set.json").read_text())["pending"] == [folder.names[0], folder.names[2]]
    assert folder_state(out, details_of(spec)["request"]) == "unfinished"

    again = SetFolder(out, details_of(spec), title="t")  # the same request: completed, image 1 kept
    made: list[list[int] | None] = []
    make_set(again, spec.plan(), lambda images, progress: made.append(images) or coloured(images, progress))
    assert made == [[0, 2]]  # the chunks that hold the missing images, with the reference
    sidecar_after = json.loads((out / "set.json").read_text())
    assert "pending" not in sidecar_after and (out / "grid.png").is_file()
    assert Image.open(out / folder.names[1]).getpixel((0, 0)) == (0, 0, 0)  # kept, not made again
    assert SetFolder(out, details_of(spec), title="t").complete


def test_another_set_is_refused_or_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "set"
    first, second = SetSpec(prompts=PROMPTS), SetSpec(prompts=PROMPTS, seed=3)
    make_set(SetFolder(out, details_of(first), title="t"), first.plan(), coloured)
    with pytest.raises(ValueError, match="holds another set"):
        SetFolder(out, details_of(second), title="t")
    replacing = SetFolder(out, details_of(second), title="t", overwrite=True)
    assert replacing.folder == tmp_path / ".set.replacing"
    replacing.start()
    assert json.loads((out / "set.json").read_text())["seed"] == 0  # the old set stays whole meanwhile
    make_set(replacing, second.plan(), coloured)
    assert json.loads((out / "set.json").read_text())["seed"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds no set written by style-aligned"):
        SetFolder(tmp_path / "photos", details_of(first), title="t", overwrite=True)


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def without_versions(data: bytes) -> dict[str, Any]:
    return {key: value for key, value in json.loads(data).items() if key != "versions"}


class Crash(Exception):
    """A crash in the middle of a set."""


@pytest.mark.parametrize("crash", ["denoising", "no image", "one image", "every image"])
def test_generate_killed_part_way_is_completed_by_the_same_command(
    sd1_pipeline: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    crash: str,
) -> None:
    monkeypatch.setattr(command_options, "load_model", lambda args: sd1_pipeline)
    prompts = [argument for prompt in [*PROMPTS, "a toy plane"] for argument in ("--prompt", prompt)]
    command = ["generate", *prompts, "--size", "64x64", "--steps", "2", "--chunk-size", "2", "--seed", "7"]
    cli([*command, "--out", str(tmp_path / "whole")])
    out = tmp_path / "resumed"

    with monkeypatch.context() as patch:
        if crash == "denoising":
            calls = iter(range(100))
            predict = UNetBackbone.predict

            def crashing(*args: Any, **kwargs: Any) -> Any:
                if next(calls) == 1:
                    raise Crash
                return predict(*args, **kwargs)

            patch.setattr(UNetBackbone, "predict", crashing)
        else:
            keep = {"no image": 0, "one image": 1, "every image": 4}[crash]
            add, added = SetFolder.add, iter(range(100))

            def crashing_add(self: SetFolder, index: int, image: Image.Image) -> None:
                if next(added) == keep:
                    raise Crash
                add(self, index, image)

            patch.setattr(SetFolder, "add", crashing_add)
            if crash == "every image":
                patch.setattr(SetFolder, "finish", lambda self: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            cli([*command, "--out", str(out)])
    pending = json.loads((out / "set.json").read_text()).get("pending", [])
    written = {path.name for path in out.glob("0*.png")}
    assert len(written) == {"denoising": 0, "no image": 0, "one image": 1, "every image": 4}[crash]
    assert set(pending) == set(json.loads((out / "set.json").read_text())["images"]) - written  # never claims more

    capsys.readouterr()
    cli([*command, "--out", str(out)])  # the same command again completes the set
    whole, resumed = files(tmp_path / "whole"), files(out)
    assert without_versions(whole.pop("set.json")) == without_versions(resumed.pop("set.json"))
    assert whole == resumed
    cli([*command, "--out", str(out)])  # and a finished set is left as it is
    assert "already holds this set" in capsys.readouterr().err


def test_generate_killed_by_a_signal_then_run_again(sd1_converted: Path, tmp_path: Path) -> None:
    """A real kill (SIGKILL) after the first images are written, then the same command again."""
    prompts = [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]
    command = [sys.executable, "-m", "style_aligned.cli", "generate", "--model", str(sd1_converted), *prompts,
               "--size", "64x64", "--steps", "2", "--chunk-size", "1", "--seed", "2"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(out)], env=environment, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("00-*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert "pending" in json.loads((out / "set.json").read_text())
    for folder in (out, tmp_path / "whole"):
        subprocess.run([*command, "--out", str(folder)], env=environment, check=True, capture_output=True, timeout=600)
    whole, resumed = files(tmp_path / "whole"), files(out)
    assert without_versions(whole.pop("set.json")) == without_versions(resumed.pop("set.json"))
    assert whole == resumed
