"""A generated set on disk: one PNG per image, a labelled grid, and a JSON sidecar of every parameter."""

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from style_aligned.pipeline.images import labelled_grid, save_png
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.progress import Progress, ProgressEvent
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.safetensors_io import partial_name, remove_stale_partials

SIDECAR = "set.json"
GRID = "grid.png"
SWEEP_SIDECAR = "sweep.json"


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


def set_title(command: str, seed: int) -> str:
    """The title of a set's grid image, for the command that made it (`generate` or `transfer`)."""
    return f"style transfer, seed {seed}" if command == "transfer" else f"style-aligned set, seed {seed}"


PENDING = "pending"
"""The sidecar's key that lists the images of an unfinished set that are still to come."""
REQUEST = "request"
"""The sidecar's key that records what was asked for (the command, the model, the spec as given, the references):
a set asked for again with the same request is the same set, and is completed or skipped instead of refused."""
STAGING = ".replacing"
"""The suffix of the folder (beside the set's) where a set that replaces another is written until it is complete."""


def set_request(command: str, spec: SetSpec, **inputs: Any) -> dict[str, Any]:
    """What a set was asked for, as JSON: the command, the spec as given (before the model's defaults) and the other
    inputs (the model, the reference images...)."""
    return json.loads(json.dumps({"command": command, **asdict(spec), **inputs}, default=_plain))


class SetFolder:
    """The one writer of a set on disk: `set.json`, one PNG per image, written as the images come, then `grid.png`.

    Until the set is complete, `set.json` lists under `pending` the images still to come, so the folder never claims
    images it does not hold; the same request again completes it (`missing` are the images left to make) and a
    complete set of the same request is left as it is. A folder that holds something else is never written over,
    unless `overwrite` is given and it holds a set: the new set is then written beside it (`.NAME.replacing`) and takes
    its place only when complete, so the old set stays whole if the new one fails.

    Attributes:
        out: The set's folder.
        folder: Where the set is being written (`out`, or its staging folder when replacing another set).
        details: The sidecar (see `sidecar`), its `request` included.
        missing: The indices of the images still to make.
    """

    def __init__(self, out: Path, details: dict[str, Any], *, title: str, overwrite: bool = False) -> None:
        """Check what `out` holds (see `folder_state`); nothing is written until `start`.

        Raises:
            ValueError: If `out` holds something else than this set and may not be replaced.
        """
        self.out, self.details, self.title = out, details, title
        self.names: list[str] = list(details["images"])
        state = folder_state(out, details[REQUEST])
        if state == "other" and not overwrite:
            raise ValueError(f"{out} holds another set: choose another folder, or pass --overwrite to replace it")
        if state == "foreign":
            raise ValueError(
                f"{out} is not empty and holds no set written by style-aligned: it is not replaced, even with"
                " --overwrite; choose another folder"
            )
        self.folder = out.with_name(f".{out.name}{STAGING}") if state == "other" else out
        if self.folder != out and folder_state(self.folder, details[REQUEST]) not in ("new", "unfinished"):
            shutil.rmtree(self.folder)
        self.missing = [i for i, name in enumerate(self.names) if not (self.folder / name).is_file()]

    @property
    def complete(self) -> bool:
        """Whether `out` already holds the whole set of this request."""
        return self.folder == self.out and folder_state(self.out, self.details[REQUEST]) == "complete"

    def start(self) -> None:
        """Create the folder and write the sidecar, the images still to come listed as pending."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_sidecar()

    def add(self, index: int, image: Image.Image) -> None:
        """Write image `index` (atomically) and take it off the pending list."""
        save_png(image, self.folder / self.names[index])
        if index in self.missing:
            self.missing.remove(index)
            self._write_sidecar()

    def finish(self) -> None:
        """Write the grid of every image and the final sidecar; a replacement then takes the old set's place.

        Raises:
            RuntimeError: If images are still missing.
        """
        if self.missing:
            raise RuntimeError(f"the set in {self.folder} still lacks {', '.join(self.names[i] for i in self.missing)}")
        prompts: list[str] = self.details["image_prompts"]
        count = len(self.details.get("references", [])) or 1
        labels = [f"reference: {p}" if i < count else p for i, p in enumerate(prompts)]
        images = [Image.open(self.folder / name) for name in self.names]
        save_png(labelled_grid(images, labels, title=self.title), self.folder / GRID)
        self._write_sidecar()
        if self.folder != self.out:
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.folder, self.out)
            shutil.rmtree(old)

    def _write_sidecar(self) -> None:
        pending = {PENDING: [self.names[i] for i in self.missing]} if self.missing else {}
        write_json(self.folder / SIDECAR, self.details | pending)


def make_set(
    folder: SetFolder,
    plan: SetPlan,
    make: Callable[[list[int] | None, Progress], object],
    *,
    progress: Progress | None = None,
) -> None:
    """Make the images that a set's folder lacks, writing each as soon as it is decoded, then finish the folder.

    Args:
        folder: The set's folder (see `SetFolder`).
        plan: How the set is cut (see `SetPlan`): only the chunks that hold missing images are made.
        make: Makes some images of the set (`None`: all; see `generate_set`'s `images`), reporting each decoded image
            to the progress it is given.
        progress: Called with every event of `make`.
    """
    if folder.complete:
        return
    folder.start()

    def write(event: ProgressEvent) -> None:
        if event.image is not None and event.index in folder.missing:
            folder.add(event.index, event.image)
        if progress:
            progress(event)

    wanted = plan.covering(folder.missing)
    if wanted != []:
        make(wanted, write)
    folder.finish()


def folder_state(folder: Path, asked: dict[str, Any]) -> str:
    """What a folder holds for a request: `"new"` (nothing), `"unfinished"` or `"complete"` (a set of this request,
    some of its images still to come or none), `"other"` (another set, or a sweep) or `"foreign"` (other files)."""
    if not folder.is_dir() or not any(folder.iterdir()):
        if folder.exists() and not folder.is_dir():
            return "foreign"
        return "new"
    try:
        details = read_sidecar(folder)
    except (FileNotFoundError, ValueError):
        return "other" if (folder / SWEEP_SIDECAR).is_file() else "foreign"
    if details.get(REQUEST) != asked:
        return "other"
    names = [*details.get("images", []), GRID]
    return "unfinished" if details.get(PENDING) or not all((folder / n).is_file() for n in names) else "complete"


def read_sidecar(directory: Path) -> dict[str, Any]:
    """Read the sidecar of a set written by `generate` or `transfer`.

    Raises:
        FileNotFoundError: If the folder holds no set.
    """
    path = directory / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {SIDECAR}: it is not a set written by style-aligned")
    return json.loads(path.read_text())
