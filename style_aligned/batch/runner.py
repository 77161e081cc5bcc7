"""The batch driver: which sets are left to make, their tasks on the workers, retries, progress, and the set folders.

Only the driver writes: each set's folder is written whole into a temporary folder under the output folder and
renamed, so a set's folder exists only when the set is complete, and a rerun skips it.
"""

import fcntl
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from style_aligned.batch.executors import Executor, Finished
from style_aligned.batch.manifest import SetEntry
from style_aligned.batch.worker import Rendered, Task
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.set_files import GRID, PARTIAL, SIDECAR, write_complete_set

BATCH_KEY = "batch"
"""The sidecar's key that records the manifest line a set was made from (its id, split and identity)."""


@dataclass(frozen=True, kw_only=True)
class BatchProgress:
    """Where a batch stands, after an event.

    Attributes:
        total: The sets of the manifest.
        done: Sets made in this run.
        skipped: Sets found complete from an earlier run.
        failed: Sets that failed after their retries.
        running: Sets with work on a worker now.
        message: What just happened (empty for a mere update).
    """

    total: int
    done: int
    skipped: int
    failed: int
    running: int
    message: str = ""


@dataclass
class BatchSummary:
    """The end of a batch: the ids of the sets done, skipped and failed (with their last error)."""

    done: list[str] = field(default_factory=lambda: [])
    skipped: list[str] = field(default_factory=lambda: [])
    failed: dict[str, str] = field(default_factory=lambda: {})

    def lines(self) -> list[str]:
        """The summary for people: the counts, then each failed set and why."""
        total = len(self.done) + len(self.skipped) + len(self.failed)
        counts = f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
        return [f"{total} sets: {counts}", *(f"failed {key}: {error}" for key, error in self.failed.items())]


def set_folder(out: Path, entry: SetEntry) -> Path:
    return out / entry.id


def plan(entries: list[SetEntry], out: Path) -> tuple[list[SetEntry], list[SetEntry]]:
    """Split the sets into those to make and those already complete in `out` for the same line.

    Returns:
        The sets to make and the sets to skip, in manifest order.

    Raises:
        ValueError: If a set's folder holds something else than this line's set (another spec, another program's
            files, an incomplete set): it is never overwritten.
    """
    to_make: list[SetEntry] = []
    complete: list[SetEntry] = []
    problems: list[str] = []
    for entry in entries:
        folder = set_folder(out, entry)
        if not folder.exists():
            to_make.append(entry)
        elif problem := folder_problem(folder, entry):
            problems.append(f"{folder} (line {entry.line}) {problem}: move it away or change the id")
        else:
            complete.append(entry)
    if problems:
        raise ValueError("\n".join(problems))
    return to_make, complete


def folder_problem(folder: Path, entry: SetEntry) -> str | None:
    """Why `folder` is not the complete set of `entry`, or `None` if it is."""
    try:
        sidecar: dict[str, Any] = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return f"holds no readable {SIDECAR}"
    made_from = sidecar.get(BATCH_KEY, {}).get("set") if isinstance(sidecar.get(BATCH_KEY), dict) else None
    if made_from is None:
        return "holds a set not made by a batch"
    identity = entry.identity()
    if made_from != identity:
        differing = sorted(key for key in identity.keys() | made_from.keys() if identity.get(key) != made_from.get(key))
        return f"holds a set made from another spec ({', '.join(differing)} differ)"
    missing = [name for name in [*sidecar.get("images", []), GRID] if not (folder / name).is_file()]
    if missing:
        return f"is incomplete ({missing[0]} is missing)"
    return None


@contextmanager
def output_lock(out: Path) -> Generator[None]:
    """Hold the output folder for this batch alone (a lock the system drops if the process dies), and remove the
    temporary folders that a batch killed earlier left behind.

    Raises:
        ValueError: If another batch holds the folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another batch is writing to {out}") from None
        for stale in out.iterdir():
            if stale.is_dir() and PARTIAL.fullmatch(stale.name):
                shutil.rmtree(stale)
        yield
    finally:
        os.close(descriptor)


@dataclass
class _SetRun:
    """A set being made: its shares, what they made, its tasks on the workers."""

    entry: SetEntry
    shares: list[tuple[int, ...]]
    rendered: dict[int, Rendered] = field(default_factory=lambda: {})
    running: int = 0
    started: float | None = None
    failed: bool = False


class BatchRunner:
    """Makes the sets of a manifest on an executor's workers; see `run_batch`."""

    def __init__(
        self,
        entries: list[SetEntry],
        skipped: list[SetEntry],
        out: Path,
        *,
        executor: Executor,
        max_retries: int,
        progress: Callable[[BatchProgress], None] | None,
    ) -> None:
        self.out, self.executor, self.max_retries, self._progress = out, executor, max_retries, progress
        self.summary = BatchSummary(skipped=[entry.id for entry in skipped])
        self.total = len(entries) + len(skipped)
        self.sets = {entry.id: _SetRun(entry, entry.shares()) for entry in entries}
        self.pending: deque[Task] = deque(task for run in self.sets.values() for task in self._first_tasks(run))

    def _first_tasks(self, run: _SetRun) -> list[Task]:
        entry = run.entry
        if len(run.shares) == 1:
            return [Task(entry=entry)]
        if entry.kind == "transfer" and entry.trajectory is None:  # invert once, then every share reuses it
            return [Task(entry=entry, invert=True)]
        return [Task(entry=entry, images=share) for share in run.shares]

    def report(self, message: str = "") -> None:
        if self._progress:
            running = sum(1 for run in self.sets.values() if run.running)
            summary = self.summary
            done, skipped, failed = len(summary.done), len(summary.skipped), len(summary.failed)
            self._progress(
                BatchProgress(
                    total=self.total, done=done, skipped=skipped, failed=failed, running=running, message=message
                )
            )

    def run(self) -> BatchSummary:
        """Run every task to its end: each set is written when its last share is made, or reported failed."""
        self.report()
        while self.pending or any(run.running for run in self.sets.values()):
            for slot in self.executor.idle():
                if not self.pending:
                    break
                task = self._next(self.executor.model(slot))
                run = self.sets[task.entry.id]
                run.running += 1
                run.started = run.started or time.monotonic()
                self.executor.submit(slot, task)
                self.report(f"started {task.describe()}" + (f", attempt {task.attempt}" if task.attempt > 1 else ""))
            for finished in self.executor.wait():
                self._finish(finished)
        return self.summary

    def _next(self, model: Path | None) -> Task:
        """The next task, preferring one for the model that the worker has loaded."""
        for index, task in enumerate(self.pending):
            if task.entry.model == model:
                del self.pending[index]
                return task
        return self.pending.popleft()

    def _finish(self, finished: Finished) -> None:
        task = finished.task
        run = self.sets[task.entry.id]
        run.running -= 1
        if run.failed:
            return
        if finished.error is not None:
            self._failed(run, task, finished.error)
        elif isinstance(finished.result, ReferenceTrajectory):
            shares = [Task(entry=run.entry, images=share, trajectory=finished.result) for share in run.shares]
            self.pending.extendleft(reversed(shares))
            self.report(f"inverted the reference of {run.entry.id}")
        else:
            assert isinstance(finished.result, Rendered)
            run.rendered[0 if task.images is None else run.shares.index(task.images)] = finished.result
            if len(run.rendered) == len(run.shares):
                self._write(run)

    def _failed(self, run: _SetRun, task: Task, error: str) -> None:
        if task.attempt <= self.max_retries:
            self.pending.append(replace(task, attempt=task.attempt + 1))
            self.report(f"{task.describe()} failed (attempt {task.attempt}), retrying: {error}")
            return
        run.failed = True
        self.pending = deque(pending for pending in self.pending if pending.entry.id != run.entry.id)
        attempts = f"{task.attempt} attempt{'s' if task.attempt > 1 else ''}"
        self.summary.failed[run.entry.id] = f"{error} (after {attempts})"
        self.report(f"failed {task.describe()} after {attempts}: {error}")

    def _write(self, run: _SetRun) -> None:
        entry = run.entry
        first = run.rendered[0]
        images = {index: image for rendered in run.rendered.values() for index, image in rendered.images.items()}
        details = {**first.details, BATCH_KEY: {"id": entry.id, "split": entry.split, "set": entry.identity()}}
        folder = set_folder(self.out, entry)
        try:
            if sorted(images) != list(range(len(first.prompts))):
                raise RuntimeError(f"the shares made images {sorted(images)} of {len(first.prompts)}")
            ordered = [images[index] for index in range(len(first.prompts))]
            write_complete_set(folder, details=details, images=ordered, prompts=first.prompts, title=first.title)
        except (OSError, RuntimeError) as error:
            run.failed = True
            self.summary.failed[entry.id] = f"cannot write {folder}: {error}"
            self.report(f"failed {entry.id}: cannot write {folder}: {error}")
            return
        run.rendered.clear()
        self.summary.done.append(entry.id)
        seconds = time.monotonic() - (run.started or time.monotonic())
        self.report(f"done {entry.id}: {len(ordered)} images in {seconds:.0f} s -> {folder}")


def run_batch(
    entries: list[SetEntry],
    out: Path,
    *,
    executor: Callable[[], Executor],
    max_retries: int = 1,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Make the sets of a manifest that `out` does not hold yet.

    Sets whose folder holds the complete set of the same line are skipped. A failed task is retried up to
    `max_retries` times, then its set is reported failed; a failure never stops the other sets.

    Args:
        entries: The manifest's sets (see `read_manifest`).
        out: The output folder: each set in `out/ID`.
        executor: Makes the workers (called only if there is work left, after every check).
        max_retries: How many times a failed task is tried again.
        progress: Called after every event.

    Returns:
        The sets done, skipped and failed.

    Raises:
        ValueError: If a set's folder holds something else, or another batch is writing to `out` (before any work).
    """
    to_make, skipped = plan(entries, out)
    with output_lock(out):
        to_make, skipped = plan(entries, out)  # again, now that no other batch can write
        runner = BatchRunner(
            to_make, skipped, out, executor=_lazy(executor), max_retries=max_retries, progress=progress
        )
        try:
            return runner.run()
        finally:
            runner.executor.close()


class _lazy:
    """An executor made on first use, so that a batch with nothing left to make starts no worker."""

    def __init__(self, make: Callable[[], Executor]) -> None:
        self._make = make
        self._executor: Executor | None = None

    def _get(self) -> Executor:
        if self._executor is None:
            self._executor = self._make()
        return self._executor

    def idle(self) -> list[int]:
        return self._get().idle()

    def model(self, slot: int) -> Path | None:
        return self._get().model(slot)

    def submit(self, slot: int, task: Task) -> None:
        self._get().submit(slot, task)

    def wait(self) -> list[Finished]:
        return self._get().wait()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
