"""Stage wall time and peak memory: a background sampler of the RSS of this process tree
(the driver plus, for a local Ray, the raylet and every worker it started)."""
from __future__ import annotations

import threading
import time

import psutil


class StageMonitor:
    """Context manager: `.seconds` wall time, `.peak_rss_mb` max summed RSS of the process tree (MiB)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> float:
        root = psutil.Process()
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "StageMonitor":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.seconds = time.perf_counter() - self._t0
