"""A generated set on disk: one PNG per image, a labelled grid, and a JSON sidecar of every parameter."""

import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from style_aligned.pipeline.generate import SetSpec
from style_aligned.pipeline.images import labelled_grid, save_png
from style_aligned.weights.safetensors_io import partial_name, remove_stale_partials

SIDECAR = "set.json"
GRID = "grid.png"


def image_name(index: int, prompt: str, num_references: int = 1) -> str:
    """The file name of image `index` (the first `num_references` are references), e.g. `01-a-toy-train.png`."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "image"
    return f"{index:02d}-{'reference-' if index < num_references else ''}{slug}.png"


def _plain(value: object) -> str:
    return "(an image given in memory)" if isinstance(value, Image.Image) else str(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (paths as text)."""
    remove_stale_partials(path)
    temporary = partial_name(path)
    try:
        temporary.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sidecar(command: str, spec: SetSpec, prompts: Sequence[str], **details: Any) -> dict[str, Any]:
    """Everything needed to reproduce a set: the command, the settings, the references, the image files and the
    versions."""
    count = spec.num_references()
    weights = spec.mixture_weights()
    return {
        "command": command,
        **{key: value for key, value in asdict(spec).items()},
        "classifier_free_guidance": spec.classifier_free_guidance,
        "image_prompts": list(prompts),
        "references": [{"prompt": prompts[i], "weight": weights[i]} for i in range(min(count, len(prompts)))],
        "images": [image_name(index, prompt, count) for index, prompt in enumerate(prompts)],
        "grid": GRID,
        **details,
        "versions": sidecar_versions(),
    }


def sidecar_versions() -> dict[str, str]:
    """The versions of style-aligned, Refiners and torch, for sidecars."""
    return {name: version(name) for name in ("style-aligned", "refiners")} | {"torch": torch.__version__}


def write_set_images(
    directory: Path, images: Sequence[Image.Image], prompts: Sequence[str], *, title: str, num_references: int = 1
) -> None:
    """Write each image (atomically, so an interruption never leaves a partial file), then the labelled grid."""
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        save_png(image, directory / image_name(index, prompt, num_references))
    labels = [f"reference: {p}" if i < num_references else p for i, p in enumerate(prompts)]
    save_png(labelled_grid(images, labels, title=title), directory / GRID)


def set_title(command: str, seed: int) -> str:
    """The title of a set's grid image, for the command that made it (`generate` or `transfer`)."""
    return f"style transfer, seed {seed}" if command == "transfer" else f"style-aligned set, seed {seed}"


PARTIAL = re.compile(r"\..+\.[0-9a-f]{8}\.partial")
"""The name of a set folder being written (see `write_complete_set`)."""


def write_complete_set(
    directory: Path, *, details: dict[str, Any], images: Sequence[Image.Image], prompts: Sequence[str], title: str
) -> None:
    """Write a whole set (sidecar, images, grid) so that its folder appears only when complete.

    Everything is written into a temporary folder beside `directory` (same file system), which is then renamed.

    Args:
        directory: The set's folder; it must not exist.
        details: The sidecar (see `sidecar`).
        images: The images, the reference first.
        prompts: Their prompts.
        title: The title of the grid image.

    Raises:
        FileExistsError: If `directory` exists.
    """
    if directory.exists():
        raise FileExistsError(f"{directory} exists: a set is never written over another")
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.partial")
    temporary.mkdir()
    try:
        write_json(temporary / SIDECAR, details)
        write_set_images(temporary, images, prompts, title=title)
        os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def read_sidecar(directory: Path) -> dict[str, Any]:
    """Read the sidecar of a set written by `generate` or `transfer`.

    Raises:
        FileNotFoundError: If the folder holds no set.
    """
    path = directory / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {SIDECAR}: it is not a set written by style-aligned")
    return json.loads(path.read_text())
