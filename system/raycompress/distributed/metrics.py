"""raycompress's metrics in Ray's metrics system (`ray.util.metrics`), and a progress reporter.

Each node's metrics agent (ray[default]) exports what the processes on it record to Prometheus,
with Ray's `ray_` prefix: `ray_raycompress_layers_done{job="smoke"}` etc.; the Grafana dashboard
`infra/grafana/raycompress.json` plots them. Metric objects are made once per process, on first
use (never at import); `record` is a no-op where Ray is not initialised, because the library also
runs without Ray. Tags: `job` (the job's name) always, plus those listed per metric.
"""
from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

log = logging.getLogger(__name__)

# name -> (kind, description, extra tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "raycompress_stage": ("gauge", "1 while the stage runs, 0 after", ("stage",)),
    "raycompress_layers_total": ("gauge", "decoder layers of the model being compressed", ()),
    "raycompress_layers_done": ("gauge", "decoder layers compressed and written", ()),
    "raycompress_layer_seconds": ("histogram", "wall seconds of one decoder layer (statistics, solve, write)", ()),
    "raycompress_documents": ("counter", "corpus documents by state: read, skipped, selected", ("source", "state")),
    "raycompress_tokens": ("counter", "tokens processed: calibration tokens through each layer, tokens scored", ("stage",)),
    "raycompress_eval_requests_total": ("gauge", "log-likelihood requests of one model's evaluation", ("model",)),
    "raycompress_eval_requests_done": ("counter", "log-likelihood requests scored", ("model",)),
    "raycompress_bytes_written": ("counter", "bytes written to the output (checkpoint shards)", ()),
    "raycompress_hessian_bytes_moved": ("counter", "statistics bytes received from other compression actors", ()),
}
LAYER_SECONDS_BOUNDS = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400]


def prometheus_names() -> set[str]:
    """The series names Prometheus shows for METRICS: Ray's `ray_` prefix, `_total` on counters,
    `_bucket` / `_count` / `_sum` on histograms."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{sfx}" for name, (kind, _, _) in METRICS.items() for sfx in suffixes[kind]}


@lru_cache(maxsize=None)
def _metric(name: str):
    from ray.util import metrics as m

    kind, desc, tags = METRICS[name]
    keys = ("job", *tags)
    if kind == "counter":
        return m.Counter(name, description=desc, tag_keys=keys)
    if kind == "gauge":
        return m.Gauge(name, description=desc, tag_keys=keys)
    return m.Histogram(name, description=desc, boundaries=LAYER_SECONDS_BOUNDS, tag_keys=keys)


def record(name: str, value: float, job: str, **tags: str) -> None:
    """Add to a counter, set a gauge or observe a histogram value (`METRICS[name]`); nothing when
    Ray is not initialised in this process.

    Raises:
        KeyError: `name` is not in METRICS.
    """
    kind = METRICS[name][0]
    import ray

    if not ray.is_initialized():
        return
    metric, tags = _metric(name), {"job": job, **{k: str(v) for k, v in tags.items()}}
    if kind == "counter":
        if value > 0:
            metric.inc(value, tags=tags)
    elif kind == "gauge":
        metric.set(value, tags=tags)
    else:
        metric.observe(value, tags=tags)


class Progress:
    """Done / total of a long step, reported as a tqdm bar on a terminal and, at most every
    `every_s` seconds or `step` of the total, as one log line with the rate and ETA."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0, step: float = 0.1) -> None:
        from tqdm import tqdm

        self.what, self.total, self.unit = what, max(1, total), unit
        self.done, self.t0 = 0, time.monotonic()
        self.every_s, self.step = every_s, step
        self._last_t, self._last_frac = self.t0, 0.0
        self.bar = tqdm(total=total, desc=what, unit=unit, disable=None)  # None: off when not a terminal

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now, frac = time.monotonic(), self.done / self.total
        if self.done >= self.total or now - self._last_t >= self.every_s or frac - self._last_frac >= self.step:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s", self.what, self.done, self.total, self.unit,
                     100 * frac, rate, self.unit, "-" if math.isinf(eta) else f"{eta:.0f} s")
            self._last_t, self._last_frac = now, frac

    def close(self) -> None:
        self.bar.close()
