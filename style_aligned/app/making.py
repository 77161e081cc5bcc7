"""What the page's jobs do: sets made as `generate`, `transfer` and `sweep` make them, into new folders under --out.

A set is made chunk by chunk: each run denoises the reference with one chunk of targets, and the chunk's images are
written as soon as they are decoded, so a cancelled set keeps its finished images. With the default chunk size (all
targets at once) this is exactly the command's run; with smaller chunks the images are the same and the reference
is denoised once more per chunk.
"""

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from style_aligned.app.files import APP_FOLDER, keep_upload, new_set_folder, zip_folder
from style_aligned.app.preview import latent_preview
from style_aligned.app.studio import Cancelled, Job
from style_aligned.options import model_kind
from style_aligned.pipeline.generate import GeneratedSet, ProgressEvent, SetSpec, progress_total, target_chunks

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


def _parts(num_images: int, chunk_size: int | None) -> list[list[int]]:
    return [[0, *chunk] for chunk in target_chunks(num_images, chunk_size)] or [[0]]


def write_parts(
    job: Job,
    *,
    sd: Any,
    spec: SetSpec,
    prompts: Sequence[str],
    folder: Path,
    title: str,
    run_part: RunPart,
    done_before: int = 0,
    total: int | None = None,
) -> None:
    """Make a set's images chunk by chunk, writing each as it is decoded, then the labelled grid.

    Args:
        job: The job (its view is updated; cancelling stops at the next U-Net call or decoded image).
        sd: The model.
        spec: The resolved set.
        prompts: The prompt of every image, the reference first.
        folder: The set's folder, where its sidecar already is.
        title: The title of the grid.
        run_part: Makes the images of one part of the set.
        done_before: Work already done by the job (an inversion), for the progress bar.
        total: All the job's work (default: the parts' work after `done_before`).

    Raises:
        Cancelled: If the job was cancelled; the finished images and a grid of them are kept.
    """
    from style_aligned.pipeline.images import labelled_grid, save_png
    from style_aligned.pipeline.set_files import GRID, image_name, write_set_images

    parts = _parts(len(prompts), spec.chunk_size)
    works = [part_work(spec, len(prompts), part) for part in parts]
    total = total or done_before + sum(works)
    kind = model_kind(sd)
    images: dict[int, Image.Image] = {}
    offset = done_before
    try:
        for number, part in enumerate(parts, start=1):
            job.check()
            where = f"chunk {number}/{len(parts)}"

            def report(event: ProgressEvent, where: str = where, offset: int = offset) -> None:
                if event.phase == "decode":
                    text = f"{where}: decoding image {event.chunk}/{event.chunks}"
                else:
                    text = f"{where}: step {event.step}/{event.steps}, {event.phase}"
                job.update(done=offset + event.done, total=total, text=text)
                job.check()

            def preview(latent: Tensor) -> None:
                job.update(preview=latent_preview(latent, kind))

            generated = run_part(part, report, preview if number == 1 else None)
            for index, image in zip(part, generated.images, strict=True):
                if index not in images:
                    images[index] = image
                    path = folder / image_name(index, prompts[index])
                    save_png(image, path)
                    job.add_image(path, ("reference: " if index == 0 else "") + prompts[index])
            offset += works[number - 1]
    except Cancelled:
        kept = sorted(images)
        if kept:
            labels = [("reference: " if index == 0 else "") + prompts[index] for index in kept]
            grid = labelled_grid([images[index] for index in kept], labels, title=f"{title} (cancelled)")
            save_png(grid, folder / GRID)
            job.update(grid=folder / GRID)
        job.update(text=f"kept {len(kept)} of {len(prompts)} finished images in {folder}")
        raise
    write_set_images(folder, [images[index] for index in range(len(prompts))], prompts, title=title)
    job.update(grid=folder / GRID, done=total, total=total)


def finish(job: Job, out: Path, folder: Path, *, text: str) -> None:
    """Zip a set's folder for the download and say where it is."""
    job.update(archive=zip_folder(folder, archive_path(out, folder)), text=text)


def _mark_cancelled(folder: Path) -> None:
    from style_aligned.pipeline.set_files import SIDECAR, read_sidecar, write_json

    if (folder / SIDECAR).is_file():
        details = read_sidecar(folder)
        written = sorted(path.name for path in folder.glob("[0-9][0-9]-*.png"))
        write_json(folder / SIDECAR, details | {"cancelled": {"images_written": written}})


def _guarded(job: Job, out: Path, folder: Path, make: Callable[[], None], text: str) -> None:
    job.update(folder=folder)
    try:
        make()
    except Cancelled:
        _mark_cancelled(folder)
        job.update(archive=zip_folder(folder, archive_path(out, folder)))
        raise
    finish(job, out, folder, text=text)


def part_work(spec: Any, num_images: int, part: list[int]) -> int:
    """The units of progress of one part of a set (the reference and a chunk of targets)."""
    return progress_total(num_images=num_images, steps=spec.steps, chunk_size=spec.chunk_size, targets=part[1:])


def make_generate_set(job: Job, sd: Any, args: argparse.Namespace, *, out: Path) -> None:
    """Make the set that `generate` makes with `args`, into a new folder under `out`."""
    from style_aligned.cli.generate import generate_spec
    from style_aligned.pipeline.generate import generate_set
    from style_aligned.pipeline.set_files import SIDECAR, set_title, sidecar, write_json

    spec = generate_spec(args).resolved(sd)
    prompts = spec.image_prompts()
    folder = new_set_folder(out, prompts[0])
    write_json(folder / SIDECAR, sidecar("generate", spec, prompts, model=str(args.model)))

    def run_part(part: list[int], report: Any, preview: Any) -> GeneratedSet:
        return generate_set(sd, spec, progress=report, images=part, preview=preview)

    def make() -> None:
        write_parts(
            job,
            sd=sd,
            spec=spec,
            prompts=prompts,
            folder=folder,
            title=set_title("generate", spec.seed),
            run_part=run_part,
        )

    _guarded(job, out, folder, make, f"Done: {len(prompts)} images in {folder}")


def make_transfer_set(
    job: Job, sd: Any, args: argparse.Namespace, *, out: Path, image: Image.Image, upload: Path, memory: Inversions
) -> None:
    """Make the set that `transfer` makes with `args` and an uploaded image, into a new folder under `out`.

    The image's inversion is taken from `memory` when it was made for the same image, caption, steps, size, fit and
    guidance; otherwise it is made, saved in the new set's folder and kept in `memory`.
    """
    import hashlib

    from style_aligned.cli.transfer import transfer_details, transfer_spec
    from style_aligned.pipeline.set_files import SIDECAR, set_title, sidecar, write_json
    from style_aligned.pipeline.transfer import make_trajectory, transfer_set

    caption: str = args.captions[0]
    spec = transfer_spec(args).resolved(sd)
    prompts = [caption, *spec.prompts]
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    key = (digest, caption, spec.steps, spec.width, spec.height, spec.fit, spec.inversion_guidance)
    parts_work = sum(part_work(spec, len(prompts), part) for part in _parts(len(prompts), spec.chunk_size))
    reuse = memory.key == key and memory.file is not None and memory.file.is_file()
    total = parts_work + (0 if reuse else spec.steps)
    if reuse:
        trajectory = memory.trajectory
        job.note(f"The inversion of this image was reused from {memory.file}.")
    else:

        def inverted(done: int, steps: int) -> None:
            job.update(done=done, total=total, text=f"inverting the reference image: step {done}/{steps}")
            job.check()

        job.update(text="inverting the reference image", total=total)
        trajectory = make_trajectory(sd, image, caption, spec=spec, progress=inverted)
    folder = new_set_folder(out, f"transfer {caption}")
    args.images = [keep_upload(upload, folder)]
    if reuse:
        args.trajectories = [memory.file]
    else:
        saved = folder / TRAJECTORY_FILE
        args.save_trajectories = [saved]
        trajectory.save(saved)
        memory.key, memory.trajectory, memory.file = key, trajectory, saved
        memory.count += 1
    write_json(folder / SIDECAR, sidecar("transfer", spec, prompts, **transfer_details(args, [trajectory])))

    def run_part(part: list[int], report: Any, preview: Any) -> GeneratedSet:
        return transfer_set(sd, trajectory, spec, progress=report, images=part, preview=preview)

    def make() -> None:
        write_parts(
            job,
            sd=sd,
            spec=spec,
            prompts=prompts,
            folder=folder,
            title=set_title("transfer", spec.seed),
            run_part=run_part,
            done_before=0 if reuse else spec.steps,
            total=total,
        )

    _guarded(job, out, folder, make, f"Done: {len(prompts)} images in {folder} (style transfer)")


def make_sweep(job: Job, sd: Any, args: argparse.Namespace, *, out: Path) -> None:
    """Make the sets that `sweep` makes with `args`, and their contact sheet, into a new folder under `out`."""
    from style_aligned.cli.sweep import sweep_inputs
    from style_aligned.evaluation.sweep import run_sweep

    spec, settings = sweep_inputs(args)
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
        result = run_sweep(sd, spec, settings, out=folder, progress=report, details={"model": str(args.model)})
    except Cancelled:
        finished = [path for path in sorted(folder.iterdir()) if (path / "grid.png").is_file()]
        job.update(
            archive=zip_folder(folder, archive_path(out, folder)),
            text=f"kept the {len(finished)} finished sets of {len(settings)} in {folder}",
        )
        raise
    job.update(grid=result.contact_sheet)
    finish(job, out, folder, text=f"Done: {len(settings)} sets and their contact sheet in {folder}")
