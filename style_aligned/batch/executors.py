"""Where the tasks of a batch run: one after another in this process, or on Ray actors that each hold a pipeline."""

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from style_aligned.batch.worker import Rendered, SetWorker, Task
from style_aligned.extras import require
from style_aligned.pipeline.inversion import ReferenceTrajectory

Result = Rendered | ReferenceTrajectory


@dataclass(kw_only=True)
class Finished:
    """A task that ended, on a slot (a worker), with its result or its error.

    Attributes:
        slot: The worker it ran on.
        task: The task.
        result: What it made, if it succeeded.
        error: What went wrong (`Type: message`), if it failed.
    """

    slot: int
    task: Task
    result: Result | None = None
    error: str | None = None


class Executor(Protocol):
    """Runs tasks on slots, one task per slot at a time."""

    def idle(self) -> list[int]:
        """The slots free for a task."""
        ...

    def model(self, slot: int) -> Path | None:
        """The model the slot's worker last worked with (it is loaded there)."""
        ...

    def submit(self, slot: int, task: Task) -> None:
        """Start a task on a free slot."""
        ...

    def wait(self) -> list[Finished]:
        """Wait until at least one running task ends, and return those that ended."""
        ...

    def close(self) -> None:
        """Release the workers."""
        ...


def describe(error: BaseException) -> str:
    """An error as one line: its type and message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


class InProcess:
    """One worker in this process: tasks run one after another, when waited for. Needs no Ray."""

    def __init__(self, worker: SetWorker) -> None:
        self._worker = worker
        self._task: Task | None = None
        self._model: Path | None = None

    def idle(self) -> list[int]:
        return [] if self._task else [0]

    def model(self, slot: int) -> Path | None:
        return self._model

    def submit(self, slot: int, task: Task) -> None:
        self._task = task

    def wait(self) -> list[Finished]:
        task, self._task = self._task, None
        assert task is not None, "no task is running"
        self._model = task.entry.model
        try:
            return [Finished(slot=0, task=task, result=self._worker.run(task))]
        except Exception as error:
            return [Finished(slot=0, task=task, error=describe(error))]

    def close(self) -> None:
        pass


class RayActors:
    """Ray actors that each load a pipeline once: one GPU each where the cluster has GPUs, else on the CPU.

    Without an address, a local Ray cluster of `workers` CPUs is started (and stopped by `close`); with one, the
    existing cluster is joined and the actors are placed by Ray across its nodes.
    """

    def __init__(self, *, workers: int | None, address: str | None, options: dict[str, Any]) -> None:
        """Start or join the cluster and create the actors.

        Args:
            workers: How many actors (default: one per GPU of the cluster, or one).
            address: A running cluster's address (`ray://HOST:10001`, `HOST:6379` or `auto`).
            options: The keyword arguments of each actor's `SetWorker` (by default, with as many CPU threads as this
                process uses).

        Raises:
            MissingExtraError: If Ray is not installed.
            ValueError: If the cluster cannot be started or joined.
        """
        ray: Any = require("ray", extra="batch", feature="batches on Ray")
        self._ray = ray
        try:
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as error:
            raise ValueError(
                f"cannot start or join the Ray cluster{f' at {address}' if address else ''}: {error}"
            ) from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        if address is None and gpus and count > gpus:
            print(f"this machine has {gpus} GPU(s): running {gpus} worker(s), one per GPU", file=sys.stderr)
            count = gpus
        self._actor_class: Any = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(SetWorker)
        # Ray gives an actor one thread per CPU it asks for; on the CPU the thread count changes results in their last
        # bits, so every worker uses this process's count: a set is the same wherever it is made.
        self._options = {"threads": torch.get_num_threads(), **options}
        self._actors: list[Any] = [self._actor_class.remote(**self._options) for _ in range(count)]
        self._models: list[Path | None] = [None] * count
        self._running: dict[Any, tuple[int, Task]] = {}
        where = f"{gpus} GPU(s), one per worker" if gpus else "CPU"
        print(f"Ray: {count} worker(s) on {where}", file=sys.stderr)

    def idle(self) -> list[int]:
        busy = {slot for slot, _ in self._running.values()}
        return [slot for slot in range(len(self._actors)) if slot not in busy]

    def model(self, slot: int) -> Path | None:
        return self._models[slot]

    def submit(self, slot: int, task: Task) -> None:
        self._running[self._actors[slot].run.remote(task)] = (slot, task)
        self._models[slot] = task.entry.model

    def wait(self) -> list[Finished]:
        ray = self._ray
        ready, _ = ray.wait(list(self._running), num_returns=1)
        finished: list[Finished] = []
        for reference in ready:
            slot, task = self._running.pop(reference)
            try:
                finished.append(Finished(slot=slot, task=task, result=ray.get(reference)))
            except ray.exceptions.RayActorError as error:  # the worker died (out of memory, node lost): replace it
                with contextlib.suppress(Exception):
                    ray.kill(self._actors[slot])
                self._actors[slot] = self._actor_class.remote(**self._options)
                self._models[slot] = None
                finished.append(Finished(slot=slot, task=task, error=f"the worker died: {describe(error)}"))
            except ray.exceptions.RayTaskError as error:
                finished.append(Finished(slot=slot, task=task, error=describe(error.cause or error)))
            except Exception as error:
                finished.append(Finished(slot=slot, task=task, error=describe(error)))
        return finished

    def close(self) -> None:
        self._running.clear()
        self._ray.shutdown()
