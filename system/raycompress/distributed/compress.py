"""Compress stage on Ray: K `CompressionActor`s, each a thin shell around an `engine.LayerWorker`
holding one shard of the calibration set; the engine's layer pipeline drives them through a
`RayBackend`. Statistics, compressed weights and layer outputs move as Ray object refs, never
through the driver.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import ray
import torch

from raycompress.config import JobConfig
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.distributed.select import load_calibration
from raycompress.engine.pipeline import compress_layers
from raycompress.engine.subsets import row_subsets, split_subsets
from raycompress.models.checkpoint import write_atomic_text
from raycompress.models.weights import OffloadedModel

log = logging.getLogger(__name__)


@ray.remote
class CompressionActor:
    """Heavy state (weights, activations) lives here; every call is delegated to the LayerWorker."""

    def __init__(self, model_dir: str, input_ids: torch.Tensor, threads: int, subsets: dict[str, torch.Tensor]) -> None:
        from raycompress.engine.worker import LayerWorker

        self.worker = LayerWorker(model_dir, input_ids, torch_threads=threads, subsets=subsets)

    def call(self, method: str, *args: Any) -> Any:
        _chaos(method, args)
        return getattr(self.worker, method)(*args)

    def timings(self) -> dict:
        return dict(self.worker.timings)


CHAOS_ENV = ("RAYCOMPRESS_CHAOS_KILL_LAYER", "RAYCOMPRESS_CHAOS_MARKER")


def _chaos(method: str, args: tuple) -> None:
    """Failure injection for tests: the first actor to begin layer N (RAYCOMPRESS_CHAOS_KILL_LAYER)
    dies at once, leaving a marker file (RAYCOMPRESS_CHAOS_MARKER) so that it happens once."""
    layer, marker = (os.environ.get(k) for k in CHAOS_ENV)
    if method == "begin_layer" and layer and marker and int(args[0]) == int(layer):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


class RayBackend:
    """Backend for `engine.pipeline`: handles are ObjectRefs, passed on unresolved."""

    def __init__(self, actors: list) -> None:
        self.actors = actors
        self.size = len(actors)

    def call(self, k: int, method: str, *args: Any):
        return self.actors[k].call.remote(method, *args)

    def get(self, handles: Any) -> Any:
        return ray.get(handles)


def _spawn(job: JobConfig, model_dir: Path, shards, subsets) -> list:
    env = {k: os.environ[k] for k in CHAOS_ENV if k in os.environ}
    opts = {**actor_options(job.ray), "runtime_env": {"env_vars": env}} if env else actor_options(job.ray)
    return [CompressionActor.options(**opts).remote(str(model_dir), s, torch_threads(job.ray), g) for s, g in zip(shards, subsets)]


def run_compress(job: JobConfig, model_dir: Path, calib_path: Path, out_dir: Path, fingerprint: str, max_restarts: int = 3) -> dict:
    """Compress `model_dir` with the job's recipe into `out_dir/model`; writes compression.json.

    If an actor dies, every actor is replaced and the pipeline resumes from `progress.json`:
    finished layers are replayed from their shards, not recompressed, and the result is the same.

    Raises:
        ray.exceptions.RayActorError: actors kept dying after `max_restarts` restarts.
    """
    from ray.exceptions import RayActorError

    ids, table = load_calibration(calib_path)
    k = min(job.ray.compress_actors, ids.shape[0])
    shards = torch.tensor_split(ids, k)  # contiguous, deterministic data-parallel shards
    sources = table.column("source").to_pylist() if "source" in table.column_names else [""] * len(ids)
    subsets = split_subsets(row_subsets(job.compress, sources), k)
    model = OffloadedModel(model_dir)
    restarts = 0
    while True:
        actors = _spawn(job, model_dir, shards, subsets)
        try:
            records = compress_layers(RayBackend(actors), model, job.compress, out_dir, fingerprint)
            timings = ray.get([a.timings.remote() for a in actors])
            break
        except RayActorError as exc:
            if restarts >= max_restarts:
                raise
            restarts += 1
            log.warning("a compression actor died (%s); restart %d/%d, resuming from %s",
                        type(exc).__name__, restarts, max_restarts, out_dir / "progress.json")
        finally:
            for a in actors:
                ray.kill(a)
    result = {"algorithm": job.compress.algorithm, "config": job.compress.model_dump(mode="json"),
              "actors": k, "restarts": restarts, "actor_timings_s": timings, "modules": records}
    write_atomic_text(out_dir / "compression.json", json.dumps(result, indent=2))
    return result
