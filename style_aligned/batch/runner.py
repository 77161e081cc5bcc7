"""The batch driver: which sets are left to make, their tasks on the workers, retries, progress, and the set folders.

Only the driver writes, through the one writer of sets (`SetFolder`): each share's images are written as soon as
the share is made, the set's `set.json` listing those still to come, so a rerun skips the complete sets and makes
only the missing shares of the others.
"""

import fcntl
import os
import time
from collections import deque
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from style_aligned.batch.executors import Executor, Finished
from style_aligned.batch.manifest import SetEntry
from style_aligned.batch.worker import Rendered, Task
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.set_files import REQUEST, SIDECAR, SetFolder, folder_state, read_sidecar

BATCH_KEY = "batch"
"""The sidecar's key that records the manifest line a set was made from (its id and split; what it was asked for is
the sidecar's `request`, the line's `SetEntry.identity`)."""


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
    """Split the sets into those to make (new, or unfinished by an earlier run) and those already complete in `out`
    for the same line.

    Returns:
        The sets to make and the sets to skip, in manifest order.

    Raises:
        ValueError: If a set's folder holds something else than this line's set (another spec, another program's
            files): it is never overwritten.
    """
    to_make: list[SetEntry] = []
    complete: list[SetEntry] = []
    problems: list[str] = []
    for entry in entries:
        folder = set_folder(out, entry)
        state = folder_state(folder, entry.identity())
        if state in ("other", "foreign"):
            problems.append(
                f"{folder} (line {entry.line}) {folder_problem(folder, entry)}: move it away or change the id"
            )
        else:
            (complete if state == "complete" else to_make).append(entry)
    if problems:
        raise ValueError("\n".join(problems))
    return to_make, complete


def folder_problem(folder: Path, entry: SetEntry) -> str:
    """Why `folder` does not hold the set of `entry`."""
    try:
        made_from = read_sidecar(folder).get(REQUEST)
    except (FileNotFoundError, ValueError):
        return f"holds no readable {SIDECAR}"
    if not isinstance(made_from, dict):
        return "holds a set that records no request"
    identity, made = entry.identity(), cast(dict[str, Any], made_from)
    differing = sorted(key for key in identity.keys() | made.keys() if identity.get(key) != made.get(key))
    return f"holds a set made from another spec ({', '.join(differing)} differ)"


def missing_shares(out: Path, entry: SetEntry) -> list[tuple[int, ...]]:
    """The shares of a set that hold images its folder lacks (all of them for a new set)."""
    folder = set_folder(out, entry)
    if not folder.is_dir():
        return entry.shares()
    names: list[str] = read_sidecar(folder).get("images", [])
    missing = {index for index, name in enumerate(names) if not (folder / name).is_file()}
    return [share for share in entry.shares() if missing.intersection(share)] or entry.shares()[:1]


@contextmanager
def output_lock(out: Path) -> Generator[None]:
    """Hold the output folder for this batch alone (a lock the system drops if the process dies).

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
        yield
    finally:
        os.close(descriptor)


@dataclass
class _SetRun:
    """A set being made: its shares, what they made, its tasks on the workers."""

    entry: SetEntry
    shares: list[tuple[int, ...]]
    folder: SetFolder | None = None
    made: int = 0
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
        self.sets = {entry.id: _SetRun(entry, missing_shares(out, entry)) for entry in entries}
        self.pending: deque[Task] = deque(task for run in self.sets.values() for task in self._first_tasks(run))

    def _first_tasks(self, run: _SetRun) -> list[Task]:
        entry = run.entry
        if len(entry.shares()) == 1:
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
            self._write(run, finished.result)

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

    def _write(self, run: _SetRun, rendered: Rendered) -> None:
        """Write a share's images into the set's folder; the set is finished with its last share."""
        entry = run.entry
        try:
            if run.folder is None:
                details = rendered.details | {
                    REQUEST: entry.identity(),
                    BATCH_KEY: {"id": entry.id, "split": entry.split},
                }
                run.folder = SetFolder(set_folder(self.out, entry), details, title=rendered.title)
                run.folder.start()
            for index, image in sorted(rendered.images.items()):
                if index in run.folder.missing:
                    run.folder.add(index, image)
            run.made += 1
            if run.made == len(run.shares):
                run.folder.finish()
        except (OSError, RuntimeError, ValueError) as error:
            run.failed = True
            self.summary.failed[entry.id] = f"cannot write {set_folder(self.out, entry)}: {error}"
            self.report(f"failed {entry.id}: cannot write {set_folder(self.out, entry)}: {error}")
            return
        if run.made == len(run.shares):
            self.summary.done.append(entry.id)
            seconds = time.monotonic() - (run.started or time.monotonic())
            self.report(f"done {entry.id}: {len(run.folder.names)} images in {seconds:.0f} s -> {run.folder.out}")


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
