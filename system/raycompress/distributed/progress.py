"""Progress of a long step on the driver, for people: a tqdm bar on a terminal, and log lines with
the rate and ETA at most every `every_s` seconds or every `step` of the total."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

log = logging.getLogger(__name__)


class ProgressLog:
    """Done / total of a long step (e.g. evaluation requests).

    Args:
        what: the step's name in the bar and the log lines, e.g. "evaluate[dense]".
        total: items to do; `unit` names them ("requests").
        every_s: at most one line per this many seconds, unless `step` (a fraction of the total)
            was crossed since the last line; the last item always gets a line.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0, step: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from tqdm import tqdm

        self.what, self.total, self.unit = what, max(1, total), unit
        self.every_s, self.step, self.clock = every_s, step, clock
        self.done, self.t0 = 0, clock()
        self._last_t, self._last_frac = self.t0, 0.0
        self.bar = tqdm(total=total, desc=what, unit=unit, disable=None)  # None: off when not a terminal

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now, frac = self.clock(), self.done / self.total
        if self.done >= self.total or now - self._last_t >= self.every_s or frac - self._last_frac >= self.step:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s", self.what, self.done, self.total, self.unit,
                     100 * frac, rate, self.unit, "-" if math.isinf(eta) else f"{eta:.0f} s")
            self._last_t, self._last_frac = now, frac

    def close(self) -> None:
        self.bar.close()
