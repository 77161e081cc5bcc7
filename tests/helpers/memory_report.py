"""A pytest plugin that measures each test's peak memory: `python -m pytest -p tests.helpers.memory_report ...`.

For each test (its setup, call and teardown together) it records:

- `self`: the peak resident memory of the pytest process, exact (its high-water mark `VmHWM`, reset through
  `/proc/self/clear_refs` before the test);
- `tree`: the peak of the summed proportional memory (PSS) of the pytest process and all its descendants (command
  subprocesses, Ray's services and actors, the browser), sampled every 0.2 s;
- the largest single descendant seen (`child`, sampled resident memory);
- the resident memory of the pytest process before and after the test.

The terminal summary lists the tests with the largest peaks and the process's peak over the session;
`MEMORY_REPORT=FILE` also writes every test as a JSON line. Linux only. Resetting `VmHWM` makes the kernel forget the
earlier peak, so `/usr/bin/time` under-reports the pytest process's maximum while this plugin is loaded: read the
session peak it prints instead.
"""

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_PAGE = os.sysconf("SC_PAGE_SIZE")
_GIB = 1024**3


def _status_bytes(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


class _Sampler:
    def __init__(self) -> None:
        self.tree = 0
        self.child = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.2):
            children = _descendants(me)
            tree = _pss(me) + sum(_pss(pid) for pid in children)
            child = max((_rss(pid) for pid in children), default=0)
            with self.lock:
                self.tree, self.child = max(self.tree, tree), max(self.child, child)

    def reset(self) -> tuple[int, int]:
        with self.lock:
            peaks = self.tree, self.child
            self.tree = self.child = 0
        return peaks


_records: list[dict[str, Any]] = []
_sampler: _Sampler | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _sampler
    _sampler = _Sampler()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    assert _sampler is not None
    _sampler.reset()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    start = time.monotonic()
    result = yield
    tree, child = _sampler.reset()
    record = {
        "test": item.nodeid,
        "seconds": round(time.monotonic() - start, 1),
        "self_gib": round(_status_bytes("VmHWM") / _GIB, 2),
        "tree_gib": round(max(tree, _pss(os.getpid())) / _GIB, 2),
        "child_gib": round(child / _GIB, 2),
        "before_gib": round(before / _GIB, 2),
        "after_gib": round(_status_bytes("VmRSS") / _GIB, 2),
    }
    _records.append(record)
    if os.environ.get("MEMORY_REPORT"):
        with open(os.environ["MEMORY_REPORT"], "a") as report:
            report.write(json.dumps(record) + "\n")
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _records:
        return
    terminalreporter.section("peak memory (GiB): self = pytest process, tree = summed PSS with descendants")
    terminalreporter.write_line(
        f"session: pytest process {max(r['self_gib'] for r in _records):.2f}, with descendants "
        f"{max(r['tree_gib'] for r in _records):.2f}, largest descendant {max(r['child_gib'] for r in _records):.2f}"
    )
    by_peak = sorted(_records, key=lambda r: max(r["self_gib"], r["tree_gib"]), reverse=True)
    for record in by_peak[:15]:
        terminalreporter.write_line(
            f"self {record['self_gib']:6.2f}  tree {record['tree_gib']:6.2f}  child {record['child_gib']:6.2f}  "
            f"before {record['before_gib']:6.2f}  after {record['after_gib']:6.2f}  "
            f"{record['seconds']:6.1f}s  {record['test']}"
        )
