"""Time and peak memory of a call, in this process: CUDA memory on GPU, resident memory (VmHWM) on CPU."""

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measure:
    seconds: float
    peak_bytes: int

    def ratio(self, baseline: "Measure") -> tuple[float, float]:
        """(time ratio, memory ratio) against a baseline."""
        return self.seconds / baseline.seconds, self.peak_bytes / max(1, baseline.peak_bytes)


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


def release_memory() -> None:
    """Return freed memory to the system so that resident memory measures what is live."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def resident_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def measure(function: Callable[[], Any], device: torch.device, repeat: int = 3, warmup: int = 1) -> Measure:
    """Median time of `repeat` calls (after `warmup`), and the peak memory one call adds to what is live before it.

    On CPU the peak is the high-water mark of resident memory, reset through /proc/self/clear_refs before the call.
    """
    for _ in range(warmup):
        function()
    times: list[float] = []
    for _ in range(repeat):
        release_memory()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resident_bytes()
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
        function()
        peak = _status_kib("VmHWM") * 1024 - before
    return Measure(statistics.median(times), peak)


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"
