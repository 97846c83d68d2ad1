"""Peak memory of this process, split the way an actor's budget is: private memory (anonymous and
file-backed pages: tensors, libraries) apart from shared memory (Ray's object store pages this
process touched, which belong to the node's object store pool). Linux /proc/self/status, sampled
by a daemon thread; ru_maxrss (the kernel's peak of the sum) is reported beside it."""
from __future__ import annotations

import resource
import threading
import time


def _status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class PeakMemory:
    """Samples private RSS (RssAnon + RssFile) every `interval` seconds; `peak_private` in bytes."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak_private = self.private()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="raycompress-peak-memory", daemon=True)
        self._thread.start()

    @staticmethod
    def private() -> int:
        kb = _status_kb(("RssAnon", "RssFile"))
        return 1024 * (kb.get("RssAnon", 0) + kb.get("RssFile", 0))

    def _run(self) -> None:
        while True:
            self.peak_private = max(self.peak_private, self.private())
            time.sleep(self._interval)

    @staticmethod
    def peak_rss() -> int:
        """ru_maxrss in bytes (Linux reports KiB): private and shared pages together."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
