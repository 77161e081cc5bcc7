"""What the page's jobs do: sets made as `generate`, `transfer` and `sweep` make them (from the same specs and
inputs, see `read_spec`, `transfer_spec` and `sweep_inputs`), into new folders under --out.

A set is made chunk by chunk: each run denoises the reference with one chunk of targets, and the chunk's images are
written as soon as they are decoded, so a cancelled set keeps its finished images. With the default chunk size (all
targets at once) this is exactly the command's run; with smaller chunks the images are the same and the reference
is denoised once more per chunk.
"""

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from style_aligned.app.files import APP_FOLDER, keep_upload, kept_upload, new_set_folder, zip_folder
from style_aligned.app.preview import latent_preview
from style_aligned.app.studio import Cancelled, Job
from style_aligned.pipeline.images import labelled_grid, save_png
from style_aligned.pipeline.model import kind_of
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.set_files import (
    GRID,
    PENDING,
    SIDECAR,
    SetFolder,
    set_request,
    set_title,
    sidecar,
    write_json,
)
from style_aligned.pipeline.spec import GeneratedSet, SetSpec

RunPart = Callable[[list[int], Callable[[ProgressEvent], None], Callable[[Tensor], None] | None], GeneratedSet]
"""Makes some images of a set (the reference first), reporting progress and, if asked, previews of the reference."""
TRAJECTORY_FILE = "trajectory.safetensors"


class Inversions:
    """The inversion of an uploaded image kept for one page session (the latest one), so that the next set in the same
    style does not invert the image again.

    Attributes:
        key: What the kept inversion depends on: the image's content, its caption, the steps, size, fit and guidance.
        trajectory: The inversion (a `ReferenceTrajectory`).
        file: Where it was saved (in the folder of the set that made it).
        count: How many inversions the session made.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.trajectory: Any = None
        self.file: Path | None = None
        self.count = 0


def archive_path(out: Path, folder: Path) -> Path:
    """Where the zip of a set's folder goes (under the app's own folder, so the set's folder stays as made)."""
    return out / APP_FOLDER / "downloads" / f"{folder.name}.zip"


def write_parts(
    job: Job,
    *,
    sd: Any,
    folder: SetFolder,
    plan: SetPlan,
    steps: int,
    run_part: RunPart,
    done_before: int = 0,
    total: int | None = None,
) -> None:
    """Make a set's images part by part (the references and one chunk, see `SetPlan.parts`), writing each image as
    it is decoded, then the labelled grid.

    Args:
        job: The job (its view is updated; cancelling stops at the next U-Net call or decoded image).
        sd: The model.
        folder: The set's folder (see `SetFolder`).
        plan: How the set is cut.
        steps: The denoising steps of the set.
        run_part: Makes the images of one part of the set.
        done_before: Work already done by the job (an inversion), for the progress bar.
        total: All the job's work (default: the parts' work after `done_before`).

    Raises:
        Cancelled: If the job was cancelled; the finished images and a grid of them are kept.
    """
    parts = plan.parts()
    works = [plan.work(part[plan.num_references :], steps=steps) for part in parts]
    total = total or done_before + sum(works)
    kind = kind_of(sd)
    folder.start()
    try:
        for number, part in enumerate(parts, start=1):
            job.check()
            report = _part_report(
                job, f"chunk {number}/{len(parts)}", offset=done_before + sum(works[: number - 1]), total=total
            )

            def preview(latent: Tensor) -> None:
                job.update(preview=latent_preview(latent, kind))

            generated = run_part(part, report, preview if number == 1 else None)
            for index, image in zip(part, generated.images, strict=True):
                if index in folder.missing:
                    folder.add(index, image)
                    job.add_image(
                        folder.folder / folder.names[index], _label(plan, generated.prompts[part.index(index)], index)
                    )
    except Cancelled:
        _keep_cancelled(job, folder, plan)
        raise
    folder.finish()
    job.update(grid=folder.folder / GRID, done=total, total=total)


def _label(plan: SetPlan, prompt: str, index: int) -> str:
    return ("reference: " if index < plan.num_references else "") + prompt


def _part_report(job: Job, where: str, *, offset: int, total: int) -> Callable[[ProgressEvent], None]:
    def report(event: ProgressEvent) -> None:
        if event.phase == "decode":
            text = f"{where}: decoding image {event.chunk}/{event.chunks}"
        else:
            text = f"{where}: step {event.step}/{event.steps}, {event.phase}"
        job.update(done=offset + event.done, total=total, text=text)
        job.check()

    return report


def _keep_cancelled(job: Job, folder: SetFolder, plan: SetPlan) -> None:
    """Keep what a cancelled set finished: a grid of its written images, and the sidecar marked cancelled."""
    prompts: list[str] = folder.details["image_prompts"]
    kept = [index for index in range(len(folder.names)) if index not in folder.missing]
    if kept:
        images = [Image.open(folder.folder / folder.names[index]) for index in kept]
        labels = [_label(plan, prompts[index], index) for index in kept]
        grid = labelled_grid(images, labels, title=f"{folder.title} (cancelled)")
        save_png(grid, folder.folder / GRID)
        job.update(grid=folder.folder / GRID)
    written = [folder.names[index] for index in kept]
    pending = {PENDING: [folder.names[index] for index in folder.missing]}
    write_json(folder.folder / SIDECAR, folder.details | pending | {"cancelled": {"images_written": written}})
    job.update(text=f"kept {len(kept)} of {len(prompts)} finished images in {folder.folder}")


def finish(job: Job, out: Path, folder: Path, *, text: str) -> None:
    """Zip a set's folder for the download and say where it is."""
    job.update(archive=zip_folder(folder, archive_path(out, folder)), text=text)


def _guarded(job: Job, out: Path, folder: Path, make: Callable[[], None], text: str) -> None:
    job.update(folder=folder)
    try:
        make()
    except Cancelled:
        job.update(archive=zip_folder(folder, archive_path(out, folder)))
        raise
    finish(job, out, folder, text=text)


def make_generate_set(job: Job, sd: Any, given: SetSpec, *, model: str, out: Path) -> None:
    """Make the set that `generate` makes of the spec `given` with `model`, into a new folder under `out`."""
    from style_aligned.pipeline.generate import generate_set

    spec = given.resolved(sd)
    prompts = spec.image_prompts()
    folder = new_set_folder(out, prompts[0])
    asked = set_request("generate", given, model=model)
    details = sidecar("generate", spec, prompts, model=model, backbone=kind_of(sd), request=asked)
    writer = SetFolder(folder, details, title=set_title("generate", spec.seed))

    def run_part(part: list[int], report: Any, preview: Any) -> GeneratedSet:
        return generate_set(sd, spec, progress=report, images=part, preview=preview)

    def make() -> None:
        write_parts(job, sd=sd, folder=writer, plan=spec.plan(), steps=spec.num_steps, run_part=run_part)

    _guarded(job, out, folder, make, f"Done: {len(prompts)} images in {folder}")


def _inversion(
    job: Job,
    sd: Any,
    spec: Any,
    *,
    image: Image.Image,
    caption: str,
    key: tuple[Any, ...],
    memory: Inversions,
    total: int,
) -> tuple[Any, bool]:
    """The inversion of the uploaded image: the one in `memory` if made for the same `key`, else a new one; and
    whether it was reused."""
    from style_aligned.pipeline.transfer import make_trajectory

    if memory.key == key and memory.file is not None and memory.file.is_file():
        job.note(f"The inversion of this image was reused from {memory.file}.")
        return memory.trajectory, True

    def inverted(event: ProgressEvent) -> None:
        job.update(done=event.done, total=total, text=f"inverting the reference image: step {event.step}/{event.steps}")
        job.check()

    job.update(text="inverting the reference image", total=total)
    return make_trajectory(sd, image, caption, spec=spec, progress=inverted), False


def make_transfer_set(
    job: Job,
    sd: Any,
    values: Mapping[str, Any],
    *,
    model: str,
    out: Path,
    image: Image.Image,
    caption: str,
    upload: Path,
    memory: Inversions,
) -> None:
    """Make the set that `transfer` makes of the spec's `values` (see `transfer_spec`) with `model` and an uploaded
    image and its caption, into a new folder under `out`.

    The image's inversion is taken from `memory` when it was made for the same image, caption, steps, size, fit and
    guidance; otherwise it is made, saved in the new set's folder and kept in `memory`.
    """
    import hashlib

    from style_aligned.pipeline.transfer import transfer_set
    from style_aligned.pipeline.transfer_inputs import TransferReferences, transfer_spec

    references = TransferReferences(images=[upload], captions=[caption])
    given = transfer_spec(values, references)
    spec = given.resolved(sd)
    prompts = [caption, *spec.prompts]
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    key = (digest, caption, spec.num_steps, spec.width, spec.height, spec.fit, spec.inversion_guidance)
    plan = spec.plan()
    parts_work = sum(plan.work(part[plan.num_references :], steps=spec.num_steps) for part in plan.parts())
    reusable = memory.key == key and memory.file is not None and memory.file.is_file()
    total = parts_work + (0 if reusable else spec.num_steps)
    trajectory, reused = _inversion(job, sd, spec, image=image, caption=caption, key=key, memory=memory, total=total)
    folder = new_set_folder(out, f"transfer {caption}")
    references = replace(references, images=[kept_upload(upload, folder)])
    saved = memory.file if reused else folder / TRAJECTORY_FILE
    assert saved is not None
    references = replace(references, **{"trajectories" if reused else "save_trajectories": [saved]})
    details = references.details(model, [trajectory]) | {"request": references.request(model, given)}
    details |= {"backbone": kind_of(sd)}
    writer = SetFolder(folder, sidecar("transfer", spec, prompts, **details), title=set_title("transfer", spec.seed))
    keep_upload(upload, folder)  # the folder was checked empty by the writer: now it holds the set's inputs
    if not reused:
        trajectory.save(saved)
        memory.key, memory.trajectory, memory.file = key, trajectory, saved
        memory.count += 1

    def run_part(part: list[int], report: Any, preview: Any) -> GeneratedSet:
        return transfer_set(sd, trajectory, spec, progress=report, images=part, preview=preview)

    def make() -> None:
        done_before = 0 if reused else spec.num_steps
        write_parts(
            job,
            sd=sd,
            folder=writer,
            plan=plan,
            steps=spec.num_steps,
            run_part=run_part,
            done_before=done_before,
            total=total,
        )

    _guarded(job, out, folder, make, f"Done: {len(prompts)} images in {folder} (style transfer)")


def make_sweep(job: Job, sd: Any, spec: SetSpec, *, settings: list[dict[str, Any]], model: str, out: Path) -> None:
    """Make the sets that `sweep` makes of `spec` and the grid's `settings` (see `sweep_inputs`) with `model`, and
    their contact sheet, into a new folder under `out`."""
    from style_aligned.evaluation.sweep import run_sweep

    spec.resolved(sd)  # checked before a folder is made
    folder = new_set_folder(out, "sweep")
    job.update(folder=folder)

    def report(event: ProgressEvent) -> None:
        per_setting = event.total // len(settings)
        setting = min(len(settings), (event.done - 1) // per_setting + 1)
        step = f"decoding image {event.chunk}/{event.chunks}" if event.phase == "decode" else f"step {event.step}"
        text = f"setting {setting}/{len(settings)}: {step}" + ("" if event.phase == "decode" else f"/{event.steps}")
        job.update(done=event.done, total=event.total, text=text)
        job.check()

    try:
        result = run_sweep(sd, spec, settings, out=folder, progress=report, details={"model": model})
    except Cancelled:
        finished = [path for path in sorted(folder.iterdir()) if (path / "grid.png").is_file()]
        job.update(
            archive=zip_folder(folder, archive_path(out, folder)),
            text=f"kept the {len(finished)} finished sets of {len(settings)} in {folder}",
        )
        raise
    job.update(grid=result.contact_sheet)
    finish(job, out, folder, text=f"Done: {len(settings)} sets and their contact sheet in {folder}")
