"""The batch driver on a stand-in executor (no model): scheduling, retries, split sets put back together, resuming,
the output lock and leftover temporary folders."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from style_aligned.batch import BatchProgress, read_manifest, run_batch
from style_aligned.batch.executors import Finished
from style_aligned.batch.runner import output_lock
from style_aligned.batch.worker import Rendered, Task
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.set_files import image_name


class StandIn:
    """Two slots that 'make' images of one colour per index, finishing the most recent task first; sets whose id
    starts with `bad` fail."""

    def __init__(self) -> None:
        self.running: list[tuple[int, Task]] = []
        self.submitted: list[Task] = []

    def idle(self) -> list[int]:
        return [slot for slot in (0, 1) if slot not in {busy for busy, _ in self.running}]

    def model(self, slot: int) -> Path | None:
        return None

    def submit(self, slot: int, task: Task) -> None:
        self.running.append((slot, task))
        self.submitted.append(task)

    def wait(self) -> list[Finished]:
        slot, task = self.running.pop()
        entry = task.entry
        if entry.id.startswith("bad"):
            return [Finished(slot=slot, task=task, error="ValueError: cannot read the reference image")]
        if task.invert:
            trajectory = ReferenceTrajectory(
                latents=torch.zeros(2, 4, 1, 1),
                timesteps=[1],
                width=8,
                height=8,
                caption="caption",
                model="model",
                guidance=2.0,
            )
            return [Finished(slot=slot, task=task, result=trajectory)]
        prompts = entry.spec.image_prompts() if entry.kind == "generate" else ["caption", *entry.spec.prompts]
        indices = task.images if task.images is not None else tuple(range(len(prompts)))
        images = {index: Image.new("RGB", (8, 8), (index * 40, 0, 0)) for index in indices}
        details = {
            "images": [image_name(index, prompt) for index, prompt in enumerate(prompts)],
            "image_prompts": prompts,
        }
        return [
            Finished(slot=slot, task=task, result=Rendered(images=images, prompts=prompts, details=details, title="t"))
        ]

    def close(self) -> None:
        pass


def manifest(folder: Path, lines: list[dict[str, object]]) -> Path:
    path = folder / "sets.jsonl"
    path.write_text("".join(json.dumps({"kind": "generate", "width": 64, **line}) + "\n" for line in lines))
    return path


def test_retries_split_sets_and_resuming(tmp_path: Path) -> None:
    lines: list[dict[str, object]] = [
        {"id": "a", "prompts": ["x", "y"]},
        {"id": "bad", "prompts": ["x", "y"]},
        {"id": "big", "prompts": ["p0", "p1", "p2", "p3", "p4"], "split": 2},
        {"id": "tr", "kind": "transfer", "prompts": ["t1", "t2"], "image": "i.png", "caption": "c", "split": 2},
    ]
    entries = read_manifest(manifest(tmp_path, lines), model=tmp_path)
    out = tmp_path / "out"
    events: list[BatchProgress] = []
    executor = StandIn()
    summary = run_batch(entries, out, executor=lambda: executor, max_retries=2, progress=events.append)
    assert sorted(summary.done) == ["a", "big", "tr"] and summary.skipped == []
    assert summary.failed == {"bad": "ValueError: cannot read the reference image (after 3 attempts)"}
    assert summary.lines()[0] == "4 sets: 3 done, 0 skipped, 1 failed"
    assert sorted(path.name for path in out.iterdir()) == ["a", "big", "tr"]
    big = json.loads((out / "big" / "set.json").read_text())
    for index, name in enumerate(big["images"]):  # put back in order from shares that finished out of order
        with Image.open(out / "big" / name) as image:
            assert image.getpixel((0, 0)) == (index * 40, 0, 0)
    assert big["batch"] == {"id": "big", "split": 2} and big["request"] == entries[2].identity()
    assert "pending" not in big
    tr_tasks = [task for task in executor.submitted if task.entry.id == "tr"]
    assert tr_tasks[0].invert and all(task.trajectory is not None for task in tr_tasks[1:]) and len(tr_tasks) == 3
    assert [task.attempt for task in executor.submitted if task.entry.id == "bad"] == [1, 2, 3]
    assert any("retrying" in event.message for event in events) and events[-1].failed == 1
    assert max(event.running for event in events) == 2

    again = StandIn()
    summary = run_batch(entries, out, executor=lambda: again, max_retries=0)
    assert summary.skipped == ["a", "big", "tr"] and list(summary.failed) == ["bad"]
    assert [task.entry.id for task in again.submitted] == ["bad"]


def test_nothing_left_starts_no_worker_and_one_batch_at_a_time(tmp_path: Path) -> None:
    entries = read_manifest(manifest(tmp_path, [{"id": "a", "prompts": ["x"]}]), model=tmp_path)
    out = tmp_path / "out"
    run_batch(entries, out, executor=StandIn)

    def no_worker() -> StandIn:
        raise AssertionError("a worker was started")

    assert run_batch(entries, out, executor=no_worker).skipped == ["a"]
    with output_lock(out), pytest.raises(ValueError, match="another batch is writing"):
        run_batch(entries, out, executor=no_worker)
