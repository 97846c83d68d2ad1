"""Where actors run: Ray start-up and per-actor resource options from `RayConfig`."""
from __future__ import annotations

import json
import logging
import os

from raycompress.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start (or join: `ray.address`, else $RAY_ADDRESS as in a submitted job) Ray once per process; workers inherit the offline switches (not the cache
    folder, which is each node's own: $RAYCOMPRESS_CACHE_DIR there, or the job's storage.cache_dir)."""
    import ray

    if ray.is_initialized():
        return
    # a submitted job's own runtime env (Ray merges it with ours) may set these already: a key in
    # both is a conflict Ray refuses, so only the missing ones are added
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                                      "TOKENIZERS_PARALLELISM") if k in os.environ and k not in job_env.get("env_vars", {})}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True} if env else {"log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set by Ray for a submitted job
    if address:
        for key in ("num_cpus", "object_store_memory"):
            if getattr(cfg, key) is not None:
                log.info("joining the Ray cluster at %s: ray.%s=%s (a local-cluster setting) is ignored",
                         address, key, getattr(cfg, key))
        ray.init(address=address, **kwargs)
    else:
        # "local": always a fresh local Ray, never one found through /tmp/ray/ray_current_cluster
        # (a `ray start` head or a test's Cluster on this machine); `ray.address: auto` joins that.
        ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **kwargs)
        from raycompress.distributed.reaper import start

        start(os.getpid())  # a SIGKILLed driver takes its local Ray's processes with it
    log.info("ray resources: %s", ray.cluster_resources())


def gpus_per_actor(cfg: RayConfig, cluster_gpus: float) -> float:
    """`ray.gpus_per_actor` as a number: `auto` is one GPU when the cluster has one, else none."""
    if cfg.gpus_per_actor == "auto":
        return 1.0 if cluster_gpus >= 1 else 0.0
    return float(cfg.gpus_per_actor)


def actor_options(cfg: RayConfig) -> dict:
    """Ray `.options()` for one worker actor: GPUs where the cluster has them, else CPU."""
    import ray

    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus_per_actor(cfg, ray.cluster_resources().get("GPU", 0))}


def torch_threads(cfg: RayConfig) -> int:
    return cfg.torch_threads or max(1, int(cfg.cpus_per_actor))
