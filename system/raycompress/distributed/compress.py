"""Compress stage on Ray: K `CompressionActor`s, each a thin shell around an `engine.LayerWorker`
holding one shard of the calibration set on the device Ray assigned it (a GPU, or the CPU); the
engine's layer pipeline drives them through a `RayBackend`. Statistics and compressed weights move
as Ray object refs from worker to worker (each partial once toward its owner, each solved module
once to each other worker), never through the driver.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ray
import torch

from raycompress.config import JobConfig
from raycompress import chaos
from raycompress.distributed import metrics
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.distributed.restarts import RestartBudget
from raycompress.distributed.select import load_calibration
from raycompress.engine.budget import model_floors
from raycompress.engine.pipeline import Progress, compress_layers, reduce_to
from raycompress.engine.subsets import row_subsets
from raycompress.engine.transfer import shard_calibration
from raycompress.engine.worker import LayerWorker
from raycompress.models.fetch import ModelRef
from raycompress.models.weights import OffloadedModel
from raycompress.storage import uri

log = logging.getLogger(__name__)


def choose_device(gpu_ids: list, visible: str | None, cuda_available: bool) -> str:
    """The torch device for an actor Ray gave `gpu_ids`: its first GPU's position in
    CUDA_VISIBLE_DEVICES (`visible`, which Ray sets to the assigned ids), or "cpu" when it holds
    no GPU or this process sees no CUDA device."""
    if not gpu_ids or not cuda_available:
        return "cpu"
    order = [v.strip() for v in (visible or "").split(",") if v.strip()]
    first = str(gpu_ids[0])
    return f"cuda:{order.index(first) if first in order else 0}"


class _Shell(LayerWorker):
    """The actor: picks its device from Ray's assignment, then is a LayerWorker."""

    def __init__(self, *args, job_name: str = "job", **kwargs) -> None:
        self.job_name = job_name
        gpu_ids = ray.get_gpu_ids()
        device = choose_device(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available())
        if gpu_ids and device == "cpu":
            log.warning("actor was assigned GPU(s) %s but sees no CUDA device: computing on the CPU", gpu_ids)
        self.gpu_ids = list(gpu_ids)
        super().__init__(*args, device=device, **kwargs)

    def begin_layer(self, idx: int) -> int:
        chaos.layer_point(idx, "begin")
        return super().begin_layer(idx)

    def accumulate(self, *args, **kwargs) -> dict[str, int]:
        chaos.layer_point(self.layer_idx, "stats")
        return super().accumulate(*args, **kwargs)

    def solve_group(self, *args, **kwargs):
        chaos.layer_point(self.layer_idx, "solve")
        return super().solve_group(*args, **kwargs)

    def solve_layer(self, *args, **kwargs):
        chaos.layer_point(self.layer_idx, "solve")
        return super().solve_layer(*args, **kwargs)

    def reduce_stats(self, partial: dict) -> None:
        super().reduce_stats(partial)
        metrics.record("raycompress_hessian_bytes_moved", sum(st.nbytes for st in partial.values()), self.job_name,
                       transport="object_store")

    def collective_reduce(self, keys: list[str], names: list[str], owner: int, world: int, group: str,
                          transport: str = "collective") -> None:
        from raycompress.distributed.collective import collective_reduce

        t0, before = time.perf_counter(), self.bytes_in.get(self.layer_idx, 0)
        collective_reduce(self, keys, names, owner, world, group)
        self._tick("reduce", t0)
        metrics.record("raycompress_hessian_bytes_moved", self.bytes_in.get(self.layer_idx, 0) - before,
                       self.job_name, transport=transport)

    def write_layer(self, path: str, scheme=None) -> dict:
        out = super().write_layer(path, scheme)
        chaos.layer_point(self.layer_idx, "write")  # the shard is durable, the driver has not marked it
        metrics.record("raycompress_bytes_written", out["bytes"], self.job_name, stage="compress")
        return out

    def write_outside_layers(self, path: str) -> dict:
        out = super().write_outside_layers(path)
        metrics.record("raycompress_bytes_written", out["bytes"], self.job_name, stage="compress")
        return out

    def placement(self) -> dict:
        return {"gpu_ids": self.gpu_ids, "device": str(self.device),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


CompressionActor = ray.remote(_Shell)



class _Remote:
    """A `WorkerAPI` over an actor handle: `proxy.method(*args)` is `actor.method.remote(*args)`."""

    def __init__(self, actor) -> None:
        self._actor = actor

    def __getattr__(self, name: str):
        return getattr(self._actor, name).remote


class RayBackend:
    """Backend for `engine.pipeline`: handles are ObjectRefs, passed on unresolved. Statistics
    are reduced through the object store (a tree, `reduce_to`) or, with `group` set, through a
    `ray.util.collective` group (NCCL / gloo)."""

    def __init__(self, actors: list, group: str | None = None, transport: str = "object_store") -> None:
        self.actors = actors
        self.workers = [_Remote(a) for a in actors]
        self.group, self.transport = group, transport

    def get(self, handles):
        return ray.get(handles)

    def reduce(self, owner: int, keys: list[str], names: list[str]) -> list:
        if self.group is None or len(self.actors) == 1:
            return reduce_to(self, owner, keys)
        k = len(self.actors)
        return [a.collective_reduce.remote(keys, names, owner, k, self.group, self.transport) for a in self.actors]


def _spawn(job: JobConfig, model: ModelRef, shards, subsets, attempt: int = 0) -> list:
    """One actor per shard, named `compress-<rank>` (`-r<attempt>` after a restart) in the job's
    namespace (`naming`), so the dashboard shows who is who and a restart never clashes with a
    dying name. If one cannot be created, those already made are killed before the error rises."""
    from raycompress.distributed.naming import name_options

    env = chaos.env_vars()
    opts = {**actor_options(job.ray), "runtime_env": {"env_vars": env}} if env else actor_options(job.ray)
    c = job.compress
    kw = {"micro_batch": c.micro_batch, "torch_threads": torch_threads(job.ray),
          "hessian_dtype": getattr(torch, c.hessian_dtype), "job_name": job.name}
    actors: list = []
    try:
        for r, (s, g) in enumerate(zip(shards, subsets)):
            named = CompressionActor.options(**name_options("compress", r, attempt, job.name), **opts)
            actors.append(named.remote(model, s, subsets=g, rank=r, **kw))
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    return actors


def _layer_metrics(job: JobConfig, tokens_per_layer: int):
    """`compress_layers`' on_layer: layer progress, seconds and calibration tokens as metrics (the
    actors count the bytes they write)."""
    def on_layer(i: int, n: int, facts: dict) -> None:  # layers_total is set once, in run_compress
        metrics.record("raycompress_layers_done", i + 1, job.name)
        if not facts.get("replayed"):
            metrics.record("raycompress_layer_seconds", facts["seconds"], job.name)
            metrics.record("raycompress_tokens", tokens_per_layer, job.name, stage="compress", model="dense")
    return on_layer


def _sidecar_bytes(ckpt: str) -> int:
    """Bytes of the checkpoint's files besides its shards: index, config, tokenizer, manifest."""
    manifest = uri.join(ckpt, "manifest.sha256.json")
    names = [n for n in json.loads(uri.read_text(manifest))["files"] if not n.endswith(".safetensors")]
    return sum(uri.info(uri.join(ckpt, n)).size for n in names) + uri.info(manifest).size


def _backend(job: JobConfig, actors: list, attempt: int) -> RayBackend:
    """Wait for the actors to start (embedding is not a layer's time) and pick the transport."""
    from raycompress.distributed.collective import choose_transport, create_group

    devices = [p["device"] for p in ray.get([a.placement.remote() for a in actors])]
    transport = choose_transport(job.ray.collective, devices)
    log.info("compression actors on %s; statistics reduced via %s", devices, transport)
    if transport == "object_store" or len(actors) == 1:
        return RayBackend(actors)
    group = f"raycompress-{os.getpid()}-{attempt}"
    create_group(actors, transport, group)
    return RayBackend(actors, group, transport)


def _summary(job: JobConfig, model: OffloadedModel, out_dir: str, fingerprint: str, rows: list[int], seq: int,
             n_subsets: int, reports: list[dict]) -> dict:
    """Measured figures per layer and per actor, next to their analytic floors (`engine.budget`)."""
    progress = Progress(uri.join(out_dir, "progress.json"), fingerprint)
    floors = model_floors(model, job.compress, len(rows), rows, seq, job.compress.micro_batch, n_subsets)
    idx = sorted(int(i) for i in progress.layers)
    moved = [sum(r["bytes_in"].get(i, r["bytes_in"].get(str(i), 0)) for r in reports) for i in idx]
    gb = 1e9
    return {
        "seconds_per_layer": [progress.layers[str(i)]["seconds"] for i in idx],
        "bytes_moved_per_layer": moved,
        "analytic_bytes_per_layer": [floors["bytes_moved_per_layer"]] * len(idx),
        "peak_rss_gb_per_actor": [r["peak_private_rss"] / gb for r in reports],
        "peak_rss_with_object_store_gb_per_actor": [r["peak_rss"] / gb for r in reports],
        "analytic_rss_gb_per_actor": [(r["baseline_rss"] + m) / gb for r, m in zip(reports, floors["memory_bytes_per_worker"])],
        "baseline_rss_gb_per_actor": [r["baseline_rss"] / gb for r in reports],
        "peak_gpu_gb_per_actor": [None if r["peak_gpu"] is None else r["peak_gpu"] / gb for r in reports],
        "devices": [r["device"] for r in reports],
        "flops_per_layer": [floors["flops_per_layer"]] * len(idx),
        "calibration_tokens": sum(rows) * seq,
        "actor_timings_s": [r["timings"] for r in reports],
    }



def run_compress(job: JobConfig, model: ModelRef, calib_path: str, out_dir: str, fingerprint: str,
                 max_restarts: int = 3) -> dict:
    """Compress `model` with the job's recipe into `out_dir/model`; writes compression.json.

    `calib_path` and `out_dir` are locations (local paths or URIs): actors on any node read the
    model through their node cache and write their shards at `out_dir`, never on a local disk
    another node would have to read. If an actor dies (or its node), every actor is replaced, on
    whatever nodes have room, and the pipeline resumes from `progress.json` at `out_dir`: finished
    layers are replayed from their shards, not recompressed, and the result is the same.

    Raises:
        ray.exceptions.RayError: actors kept dying (or their results were lost with their node)
            after `max_restarts` restarts.
        restarts.StageFailed: an actor's own code raised (a bad weight file, a full disk, a NaN):
            not retried, since a replacement would raise it again.
    """

    ids, table = load_calibration(calib_path)
    sources = table.column("source").to_pylist() if "source" in table.column_names else [""] * len(ids)
    masks = row_subsets(job.compress, sources)
    parts = shard_calibration(ids.shape[0], job.ray.compress_actors, job.compress.micro_batch, masks)
    k, shards, subsets = len(parts), [ids[p.rows] for p in parts], [p.subsets for p in parts]
    offloaded = OffloadedModel(model)
    metrics.record("raycompress_layers_total", offloaded.num_layers, job.name)
    metrics.record("raycompress_layers_done", 0, job.name)
    budget = RestartBudget("compress", max_restarts)
    while True:
        actors = _spawn(job, model, shards, subsets, budget.used)
        try:
            backend = _backend(job, actors, budget.used)
            records = compress_layers(backend, offloaded, job.compress, out_dir, fingerprint, sorted(masks),
                                      on_layer=_layer_metrics(job, int(ids.numel())))
            reports = ray.get([a.report.remote() for a in actors])
            break
        except ray.exceptions.RayError as exc:
            budget.absorb(exc)  # raises unless an actor died and a restart is left
            log.info("resuming from %s", uri.display(uri.join(out_dir, "progress.json")))
        finally:
            for a in actors:
                ray.kill(a)
    restarts = budget.used
    result = {"algorithm": job.compress.algorithm, "config": job.compress.model_dump(mode="json"),
              "actors": k, "restarts": restarts, "statistics_transport": backend.transport,
              **_summary(job, offloaded, out_dir, fingerprint, [len(s) for s in shards], ids.shape[1], len(masks), reports),
              "modules": records}
    written = uri.write_text(uri.join(out_dir, "compression.json"), json.dumps(result, indent=2))
    metrics.record("raycompress_bytes_written", written + _sidecar_bytes(uri.join(out_dir, "model")), job.name,
                   stage="compress")
    return result
