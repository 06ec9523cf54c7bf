"""A byte-based progress line: bytes done, GB/s and ETA, throttled, on stderr."""

from __future__ import annotations

import sys
import threading
import time


def _size(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


class Progress:
    def __init__(self, total_bytes: int, *, enabled: bool = True, stream=None, interval: float = 0.5):
        self.total = max(total_bytes, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        # A progress line rewrites itself with '\r': only on a terminal (logs and CI get the final summary).
        self.enabled = enabled and (stream is not None or self.stream.isatty())
        self.interval = interval
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
                self._last = now
                self.stream.write("\r" + self.line(now) + " " * 4)
                self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        return (f"[{bar:<30}] {frac * 100:5.1f}%  {_size(self.done)} / {_size(self.total)}  "
                f"{_size(rate)}/s  ETA {eta_s}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
