"""Batches end to end on a random FLUX.1 folder (`flux_folder`) at 64x64 px, 2 steps: on a local Ray cluster of 2
workers, against each set made alone by `generate` or `transfer`, and in this process after the driver was killed.

One manifest of 4 sets (one split generate set, one split transfer, a set of two weighted references split in two and
the same set unsplit) and a set that fails (its image is missing) is made once on Ray and once without; the tests
compare those runs, and a rerun of the Ray run skips every complete set. Each Ray worker loads its own models.
"""

import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from style_aligned.batch.runner import BATCH_KEY
from style_aligned.cli import main as cli

ROOT = Path(__file__).parents[2]
CAPTION = "Man laying in a bed, medieval painting."
SETS: list[dict[str, Any]] = [
    {
        "id": "animals",
        "kind": "generate",
        "reference_prompt": "a cat, watercolor",
        "prompts": ["a dog", "a bird", "a fish"],
        "seed": 2,
        "split": 2,
        "style": {"shared_score_shift": 0.69},
    },
    {
        "id": "medieval",
        "kind": "transfer",
        "image": "reference.png",
        "caption": CAPTION,
        "prompts": ["A man working on a laptop.", "A man eats pizza."],
        "offset": 1,
        "seed": 3,
        "split": 2,
    },
    {
        "id": "fox2",
        "kind": "generate",
        "reference_prompts": ["a fox, oil paint", "a fox, watercolor"],
        "reference_weights": [2, 1],
        "prompts": ["a hare", "a deer"],
        "seed": 5,
        "split": 2,
    },
    {
        "id": "fox1",
        "kind": "generate",
        "reference_prompts": ["a fox, oil paint", "a fox, watercolor"],
        "reference_weights": [2, 1],
        "prompts": ["a hare", "a deer"],
        "seed": 5,
    },
    {"id": "broken", "kind": "transfer", "image": "missing.png", "caption": CAPTION, "prompts": ["a man"], "offset": 1},
]
COMPLETE = [line["id"] for line in SETS if line["id"] != "broken"]


def batch(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from style_aligned.cli import main; main()", "batch", str(manifest),
            "--out", str(out), "--max-retries", "1", *extra]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)


@pytest.fixture(scope="module")
def runs(flux_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest made on a local Ray cluster of 2 workers, and made without Ray by a driver killed with SIGKILL
    after its first set, then rerun."""
    folder = tmp_path_factory.mktemp("batch")
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / "reference.png")
    lines = [{"width": 64, "height": 64, "steps": 2, **line} for line in SETS]
    manifest = folder / "sets.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = ["--model", str(flux_folder)]

    on_ray = run(batch(manifest, folder / "ray", *model, "--workers", "2"))
    assert on_ray.returncode in (0, 1), on_ray.stderr
    ray_again = run(batch(manifest, folder / "ray", *model))

    local = folder / "local"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = folder / "killed.log"
    with log.open("w") as stderr:
        killed = subprocess.Popen(batch(manifest, local, *model), env=environment, stderr=stderr, text=True)
        deadline = time.monotonic() + 600
        while not (local / "animals" / "grid.png").exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    killed_output = log.read_text()
    after_kill = sorted(path.name for path in local.iterdir())
    rerun = run(batch(manifest, local, *model))
    return {
        "folder": folder,
        "model": flux_folder,
        "on_ray": on_ray,
        "ray_again": ray_again,
        "killed_output": killed_output,
        "after_kill": after_kill,
        "rerun": rerun,
    }


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def max_difference(first: bytes, second: bytes) -> int:
    """The largest difference of two PNG files' pixel values."""
    with Image.open(io.BytesIO(first)) as a, Image.open(io.BytesIO(second)) as b:
        return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_on_ray_failed_set_is_retried_and_reported_and_the_others_complete(runs: dict[str, Any]) -> None:
    on_ray: subprocess.CompletedProcess[str] = runs["on_ray"]
    assert on_ray.returncode == 1, on_ray.stderr
    assert "Ray: 2 worker(s) on CPU" in on_ray.stderr
    assert "broken failed (attempt 1), retrying: ValueError: cannot read the reference image" in on_ray.stderr
    assert "failed broken after 2 attempts" in on_ray.stderr
    assert "medieval (share 2/2)" in on_ray.stderr and "inverted the reference of medieval" in on_ray.stderr
    summary = on_ray.stdout.splitlines()
    assert "5 sets: 4 done, 0 skipped, 1 failed" in summary
    assert any(line.startswith("failed broken: ValueError: cannot read the reference image") for line in summary)
    out = runs["folder"] / "ray"
    assert sorted(path.name for path in out.iterdir()) == sorted(COMPLETE)  # no folder for the failed set


def test_sets_are_bit_identical_to_each_set_made_alone(runs: dict[str, Any], tmp_path: Path) -> None:
    """Made in this process or on the Ray workers, every file is the same bytes as the set made alone."""
    folder, model = runs["folder"], str(runs["model"])
    common = ["--model", model, "--size", "64x64", "--steps", "2"]

    def prompts(line: dict[str, Any]) -> list[str]:
        return [argument for prompt in line["prompts"] for argument in ("--prompt", prompt)]

    animals, medieval, fox2 = SETS[:3]
    references = [argument for prompt in fox2["reference_prompts"] for argument in ("--reference-prompt", prompt)]
    weights = ["--reference-weight", "2", "--reference-weight", "1"]
    commands = {
        "animals": ["generate", *common, *prompts(animals), "--reference-prompt", animals["reference_prompt"],
                    "--seed", "2", "--shared-score-shift", "0.69", "--chunk-size", "2"],  # 3 targets split in 2
        "medieval": ["transfer", *common, *prompts(medieval), "--image", str(folder / "reference.png"),
                     "--caption", CAPTION, "--offset", "1", "--seed", "3", "--chunk-size", "1"],
        "fox2": ["generate", *common, *prompts(fox2), *references, *weights, "--seed", "5", "--chunk-size", "1"],
        "fox1": ["generate", *common, *prompts(fox2), *references, *weights, "--seed", "5"],
    }  # fmt: skip
    for name, command in commands.items():
        cli([*command, "--out", str(tmp_path / name)])
        gc.collect()
        alone, batched, on_ray = (
            files(where) for where in (tmp_path / name, folder / "local" / name, folder / "ray" / name)
        )
        sidecar, batched_sidecar = (json.loads(made.pop("set.json")) for made in (alone, batched))
        assert json.loads(on_ray.pop("set.json")) == batched_sidecar
        assert batched_sidecar.pop(BATCH_KEY)["id"] == name
        assert batched_sidecar == sidecar, name
        assert alone.keys() == batched.keys() == on_ray.keys() and len(alone) == len(sidecar["images"]) + 1
        for file_name in alone:
            assert alone[file_name] == batched[file_name], f"{name}/{file_name}"
            levels = max_difference(alone[file_name], on_ray[file_name])
            assert alone[file_name] == on_ray[file_name], f"{name}/{file_name} on Ray differs by up to {levels} levels"


def test_killed_driver_rerun_without_ray_skips_finished_sets_and_gives_the_same_folders(runs: dict[str, Any]) -> None:
    assert "started animals" in runs["killed_output"] and "done medieval" not in runs["killed_output"]
    assert "animals" in runs["after_kill"] and "medieval" not in runs["after_kill"]  # killed after the first set
    rerun: subprocess.CompletedProcess[str] = runs["rerun"]
    assert rerun.returncode == 1, rerun.stderr
    assert "5 sets: 3 done, 1 skipped, 1 failed" in rerun.stdout.splitlines()
    assert "started animals" not in rerun.stderr and "Ray" not in rerun.stderr
    assert "failed broken after 2 attempts" in rerun.stderr
    local, on_ray = runs["folder"] / "local", runs["folder"] / "ray"
    assert sorted(path.name for path in local.iterdir()) == sorted(COMPLETE)  # no temporary folder is left
    for name in COMPLETE:
        made_locally, made_on_ray = files(local / name), files(on_ray / name)
        assert json.loads(made_locally.pop("set.json")) == json.loads(made_on_ray.pop("set.json"))
        assert made_locally == made_on_ray, name


def test_a_rerun_skips_every_complete_set(runs: dict[str, Any]) -> None:
    again: subprocess.CompletedProcess[str] = runs["ray_again"]
    assert again.returncode == 1, again.stderr
    assert "5 sets: 0 done, 4 skipped, 1 failed" in again.stdout.splitlines()
    assert all(f"started {name}" not in again.stderr for name in COMPLETE)


def test_two_references_split_or_not_name_their_files_as_generate(runs: dict[str, Any]) -> None:
    """A set of two weighted references, split in two shares or not, writes the same files, named as `generate`
    names them (both references marked), and records no image still to come. (Its chunks differ, 2 targets and 1 or
    all 3 at once, so its pixels may differ by a rounding: each equals `generate` with its chunk size exactly.)"""
    for where in ("ray", "local"):
        split, whole = (runs["folder"] / where / name for name in ("fox2", "fox1"))
        sidecar = json.loads((split / "set.json").read_text())
        assert sidecar["images"][:2] == ["00-reference-a-fox-oil-paint.png", "01-reference-a-fox-watercolor.png"]
        assert "pending" not in sidecar and sidecar["batch"] == {"id": "fox2", "split": 2}
        split_files, whole_files = files(split), files(whole)
        assert split_files.keys() == whole_files.keys() == {*sidecar["images"], "grid.png", "set.json"}
        for name in sidecar["images"]:
            assert max_difference(split_files[name], whole_files[name]) <= 1, name
