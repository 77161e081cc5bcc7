"""The app's server side: the model, loaded once in the background, and one job at a time, each cancellable.

A job runs in its own thread and publishes what the page shows (progress, preview, finished images, files) as a
`JobView`; the page polls it. Cancelling takes effect at the next U-Net call or decoded image.
"""

import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from style_aligned.weights.safetensors_io import WeightsError

NUMBERS = itertools.count(1)
"""The numbers of the jobs (and of the page's messages), in order."""
USER_ERRORS = (ValueError, WeightsError, FileNotFoundError)
"""The errors that a job reports as a message about the user's input, as the command line does."""


class Cancelled(Exception):
    """A job was cancelled; what it finished is kept."""


@dataclass(frozen=True, kw_only=True)
class JobView:
    """What the page shows of a job.

    Attributes:
        done: Units of work done.
        total: Units of work in all (0 while unknown).
        text: Where the job stands, in words.
        preview: The reference as it denoises (a cheap preview), while it does.
        images: The finished images and their captions, in order.
        grid: The labelled grid of the set, once written.
        folder: The set's folder, once made.
        archive: A zip of the set's folder, once it is complete or cancelled.
        notes: Things worth telling (e.g. that an inversion was reused).
        error: The message of an error, if the job failed.
        cancelled: Whether the job was cancelled.
        finished: Whether the job has ended (done, failed or cancelled).
        version: Increases with every change.
    """

    done: int = 0
    total: int = 0
    text: str = "waiting for its turn"
    preview: Image.Image | None = None
    images: tuple[tuple[Path, str], ...] = ()
    grid: Path | None = None
    folder: Path | None = None
    archive: Path | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    cancelled: bool = False
    finished: bool = False
    version: int = 0


class Job:
    """One request of the page: its view, updated by its thread, and its cancellation."""

    def __init__(self, owner: str) -> None:
        """Make a job for the page session `owner` (only that session can cancel it)."""
        self.owner = owner
        self.number = next(NUMBERS)
        self._view = JobView()
        self._changed = threading.Condition()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop at its next U-Net call or decoded image."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if the job was asked to stop."""
        if self._cancel.is_set():
            raise Cancelled

    def update(self, **changes: Any) -> None:
        """Change what the page shows of the job."""
        with self._changed:
            self._view = replace(self._view, **changes, version=self._view.version + 1)
            self._changed.notify_all()

    def add_image(self, path: Path, caption: str) -> None:
        with self._changed:
            images = (*self._view.images, (path, caption))
            self._view = replace(self._view, images=images, version=self._view.version + 1)
            self._changed.notify_all()

    def note(self, text: str) -> None:
        with self._changed:
            self._view = replace(self._view, notes=(*self._view.notes, text), version=self._view.version + 1)
            self._changed.notify_all()

    @property
    def view(self) -> JobView:
        return self._view

    def wait(self, after: int, timeout: float) -> JobView:
        """The view once it is newer than version `after`, or after `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._view.version > after, timeout=timeout)
            return self._view


@dataclass(kw_only=True)
class ModelState:
    """The model and how its loading went."""

    model: Any = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    loaded: threading.Event = field(default_factory=threading.Event)


class Studio:
    """The model, loaded once, and the jobs of the page, run one at a time.

    Example:
        ```py
        studio = Studio(load=lambda: load_pipeline("models/sd1"), description="models/sd1")
        studio.start_loading()
        job = studio.submit(Job("session"), lambda job, sd: ...)
        ```
    """

    def __init__(self, *, load: Callable[[], Any], description: str) -> None:
        """Prepare the studio.

        Args:
            load: Loads the model (`StableDiffusion_1` or `StableDiffusion_XL`); called once, in the background.
            description: The model as the page names it.
        """
        self._load = load
        self.description = description
        self.state = ModelState()
        self._turn = threading.Lock()
        self._current: Job | None = None

    def start_loading(self) -> None:
        """Load the model in a background thread (the page shows how long it has been loading)."""
        self.state.started = time.monotonic()
        threading.Thread(target=self._load_model, name="model-loading", daemon=True).start()

    def _load_model(self) -> None:
        try:
            self.state.model = self._load()
        except Exception as error:
            self.state.error = f"the model could not be loaded: {error}"
            traceback.print_exc()
        finally:
            self.state.loaded.set()

    def model_text(self) -> str:
        """The model's state in words."""
        if not self.state.loaded.is_set():
            return f"Loading the model {self.description}... {time.monotonic() - self.state.started:.0f} s"
        if self.state.error is not None:
            return f"Error: {self.state.error}"
        from style_aligned.pipeline.backbone import backbone_of

        model = self.state.model
        backbone = backbone_of(model)  # a U-Net pipeline or FLUX.1's models
        return f"Model {self.description} ready ({type(model).__name__} on {backbone.device}, {backbone.dtype})"

    def submit(self, job: Job, work: Callable[[Job, Any], None]) -> threading.Thread:
        """Run `work(job, model)` in a thread, after the jobs before it and once the model is loaded.

        Errors in the user's input (`USER_ERRORS`) become the job's message; so does any other error, with its
        traceback printed on the server; a `Cancelled` job keeps what it finished. The view is marked finished at
        the end in every case.
        """
        thread = threading.Thread(target=self._run, args=(job, work), name="job", daemon=True)
        thread.start()
        return thread

    def cancel(self, owner: str) -> bool:
        """Cancel the running job if it belongs to the page session `owner`; whether there was one."""
        job = self._current
        if job is None or job.owner != owner or job.view.finished:
            return False
        job.cancel()
        return True

    def _run(self, job: Job, work: Callable[[Job, Any], None]) -> None:
        try:
            with self._turn:
                self._current = job
                try:
                    job.check()
                    while not self.state.loaded.wait(0.5):
                        job.update(text=self.model_text())
                        job.check()
                    if self.state.error is not None:
                        raise RuntimeError(self.state.error)
                    work(job, self.state.model)
                finally:
                    self._current = None
        except Cancelled:
            job.update(cancelled=True, text=f"Cancelled. {job.view.text}")
        except USER_ERRORS as error:
            job.update(error=str(error), text=f"Error: {error}")
        except Exception as error:
            traceback.print_exc()
            job.update(error=f"{type(error).__name__}: {error}", text=f"Error: {type(error).__name__}: {error}")
        finally:
            job.update(finished=True)
