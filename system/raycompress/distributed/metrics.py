"""raycompress's metrics in Ray's metrics system (`ray.util.metrics`) and the helper that records them.

Each node's metrics agent (ray[default]) exports what the processes on it record to Prometheus,
with Ray's `ray_` prefix: `ray_raycompress_layers_done{job_name="smoke"}`, counters with the
suffix `_total`, histograms as `_bucket` / `_sum` / `_count` (`prometheus_names`); the Grafana
dashboard `infra/grafana/raycompress.json` plots every one. Metric objects are made once per
process, on first use (never at import); `record` is a no-op where Ray is not initialised, because
the library also runs without Ray. Tags: `job_name` (the job's name, passed by the caller) always,
plus those listed per metric. (Not `job`: Prometheus sets `job` to the scrape job, "ray" in Ray's
config, and would rename ours to `exported_job`.)

Where each is recorded: the driver records the stage (orchestrator), layer progress and seconds
and the compress tokens (`compress_layers`' on_layer), documents (select), evaluation requests and
tokens (the eval pool), and the bytes of the files it writes; compression actors record the bytes
of the checkpoint shards they write and the statistics bytes they receive.
"""
from __future__ import annotations

import logging
import sys
from functools import lru_cache

log = logging.getLogger(__name__)

# name -> (kind, description with unit, tag keys besides `job_name`)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "raycompress_stage": ("gauge", "1 while the stage runs, 0 after", ("stage",)),
    "raycompress_layers_total": ("gauge", "decoder layers of the model being compressed", ()),
    "raycompress_layers_done": ("gauge", "decoder layers compressed and written (or replayed on resume)", ()),
    "raycompress_layer_seconds": ("histogram", "wall seconds of one decoder layer (statistics, solve, write)", ()),
    "raycompress_documents": ("counter", "corpus documents by state: read, skipped (unusable or duplicate), "
                              "selected (calibration sequences)", ("source", "state")),
    "raycompress_tokens": ("counter", "tokens processed: calibration tokens through each compressed layer "
                           "(model=dense), model-input tokens scored (model=the label)", ("stage", "model")),
    "raycompress_eval_requests_total": ("gauge", "log-likelihood requests of one model's evaluation", ("model",)),
    "raycompress_eval_requests_done": ("counter", "log-likelihood requests scored", ("model",)),
    "raycompress_bytes_written": ("counter", "bytes of output files written (checkpoint shards, calibration "
                                  "set, manifests, results)", ("stage",)),
    "raycompress_hessian_bytes_moved": ("counter", "calibration statistics bytes (Hessians, norms) a compression "
                                        "actor received from the others", ("transport",)),
}
JOB_TAG = "job_name"
LAYER_SECONDS_BOUNDS = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400]


def prometheus_names() -> set[str]:
    """The series names Prometheus shows for METRICS once recorded: Ray's `ray_` prefix, `_total`
    on counters (Ray 2.60 exports no gauge twin), `_bucket` / `_count` / `_sum` on histograms."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{sfx}" for name, (kind, _, _) in METRICS.items() for sfx in suffixes[kind]}


def enabled() -> bool:
    """True where Ray is initialised in this process (a driver after `ray.init`, or a Ray worker)."""
    ray = sys.modules.get("ray")  # not imported: certainly not initialised, and not worth importing
    return ray is not None and ray.is_initialized()


@lru_cache(maxsize=None)
def _metric(name: str):
    from ray.util import metrics as m

    kind, desc, tags = METRICS[name]
    keys = (JOB_TAG, *tags)
    if kind == "counter":
        return m.Counter(name, description=desc, tag_keys=keys)
    if kind == "gauge":
        return m.Gauge(name, description=desc, tag_keys=keys)
    return m.Histogram(name, description=desc, boundaries=LAYER_SECONDS_BOUNDS, tag_keys=keys)


def record(name: str, value: float, job: str, **tags: object) -> None:
    """Add `value` to a counter (nothing for value <= 0), set a gauge or observe a histogram value
    (`METRICS[name]`), tagged job_name=`job` and `tags`; nothing where Ray is not initialised.
    Tag values are made strings. An error
    inside Ray is logged (debug) and swallowed: a metric never fails the work it measures.

    Raises:
        KeyError: `name` is not in METRICS.
        ValueError: `tags` are not exactly the metric's tag keys (checked with or without Ray).
    """
    kind, _, keys = METRICS[name]
    if set(tags) != set(keys):
        raise ValueError(f"metric {name} takes the job and tags {keys}, got {tuple(sorted(tags))}")
    if not enabled() or (kind == "counter" and value <= 0):
        return
    values = {JOB_TAG: str(job), **{k: str(v) for k, v in tags.items()}}
    try:
        metric = _metric(name)
        if kind == "counter":
            metric.inc(float(value), tags=values)
        elif kind == "gauge":
            metric.set(float(value), tags=values)
        else:
            metric.observe(float(value), tags=values)
    except Exception as exc:  # noqa: BLE001 - telemetry must not fail the job
        log.debug("metric %s not recorded: %s", name, exc)
