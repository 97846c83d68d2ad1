"""Compress stage on Ray: K `CompressionActor`s, each a thin shell around an `engine.LayerWorker`
holding one shard of the calibration set; the engine's layer pipeline drives them through a
`RayBackend`. Statistics, compressed weights and layer outputs move as Ray object refs, never
through the driver.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ray
import torch

from raycompress.config import JobConfig
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.distributed.select import load_calibration
from raycompress.engine.pipeline import compress_layers
from raycompress.models.checkpoint import write_atomic_text
from raycompress.models.weights import OffloadedModel

log = logging.getLogger(__name__)


@ray.remote
class CompressionActor:
    """Heavy state (weights, activations) lives here; every call is delegated to the LayerWorker."""

    def __init__(self, model_dir: str, input_ids: torch.Tensor, threads: int) -> None:
        from raycompress.engine.worker import LayerWorker

        self.worker = LayerWorker(model_dir, input_ids, torch_threads=threads)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def timings(self) -> dict:
        return dict(self.worker.timings)


class RayBackend:
    """Backend for `engine.pipeline`: handles are ObjectRefs, passed on unresolved."""

    def __init__(self, actors: list) -> None:
        self.actors = actors
        self.size = len(actors)

    def call(self, k: int, method: str, *args: Any):
        return self.actors[k].call.remote(method, *args)

    def get(self, handles: Any) -> Any:
        return ray.get(handles)


def run_compress(job: JobConfig, model_dir: Path, calib_path: Path, out_dir: Path, fingerprint: str) -> dict:
    """Compress `model_dir` with the job's recipe into `out_dir/model`; writes compression.json."""
    ids, _ = load_calibration(calib_path)
    k = min(job.ray.compress_actors, ids.shape[0])
    shards = torch.tensor_split(ids, k)  # contiguous, deterministic data-parallel shards
    opts = actor_options(job.ray)
    actors = [CompressionActor.options(**opts).remote(str(model_dir), s, torch_threads(job.ray)) for s in shards]
    try:
        records = compress_layers(RayBackend(actors), OffloadedModel(model_dir), job.compress, out_dir, fingerprint)
        timings = ray.get([a.timings.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    result = {"algorithm": job.compress.algorithm, "config": job.compress.model_dump(mode="json"),
              "actors": k, "actor_timings_s": timings, "modules": records}
    write_atomic_text(out_dir / "compression.json", json.dumps(result, indent=2))
    return result
