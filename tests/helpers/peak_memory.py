"""This process's memory (Linux, glibc): how far its resident memory rises over a stretch of code, and glibc's
settings that give freed memory back to the system.

The process's own high-water mark (`VmHWM`) is exact but can only be reset, which would hide the suite's real peak
from `/usr/bin/time` and the like: it is read, never reset. When the stretch raises it, the rise is exact; otherwise a
thread samples the resident memory every 20 ms, which no full-size model escapes (filling even an SD1 autoencoder
takes longer).
"""

import ctypes
import os
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def set_mmap_threshold(size: int) -> bool:
    """Have glibc serve every allocation of `size` bytes or more by its own mapping, returned to the system when freed
    (a fixed threshold: glibc no longer raises it). Returns whether it was set (false without glibc)."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, size))


def trim() -> None:
    """Return the free memory of glibc's heaps to the system."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {_STATUS}")


class PeakMemory:
    """`start()`, run something, then `growth()`: how far the resident memory rose above its value at the start, in
    bytes. `available` is false where the kernel does not say (not Linux)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.available = _STATUS.exists() and _STATM.exists()
        self._interval = interval
        self._page = os.sysconf("SC_PAGE_SIZE") if self.available else 4096
        self._start = self._high_water = self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _resident(self) -> int:
        return int(_STATM.read_text().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._sampled = max(self._sampled, self._resident())

    def start(self) -> None:
        if not self.available:
            return
        self.stop()
        self._start = self._sampled = self._resident()
        self._high_water = _status_bytes("VmHWM")
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def growth(self) -> int:
        if not self.available:
            return 0
        self.stop()
        peak = max(self._sampled, self._resident())
        high_water = _status_bytes("VmHWM")
        if high_water > self._high_water:  # the stretch set a new peak for the process: exact
            peak = max(peak, high_water)
        return max(0, peak - self._start)
