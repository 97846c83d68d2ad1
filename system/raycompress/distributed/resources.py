"""Where actors run: Ray start-up and per-actor resource options from `RayConfig`."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket

from raycompress.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start (or join: `ray.address`, else $RAY_ADDRESS as in a submitted job) Ray once per process; workers inherit the offline switches (not the cache
    folder, which is each node's own: $RAYCOMPRESS_CACHE_DIR there, or the job's storage.cache_dir).

    A local Ray (no address) is always a fresh one (`address="local"`, never one found through
    /tmp/ray/ray_current_cluster; `ray.address: auto` joins that), listens on `ray.bind_host`
    (`_local_ray`: loopback by default) and has its own dashboard/API port, which its workers are
    told through $RAY_API_SERVER_ADDRESS: Ray's State API (Ray Train's placement-group cleaner
    asks it whether the controller lives) then reaches this Ray, never another one on the machine
    (whose dashboard holds 8265, the port a Ray started without its own would advertise).
    """
    import ray

    if ray.is_initialized():
        return
    # a submitted job's own runtime env (Ray merges it with ours) may set these already: a key in
    # both is a conflict Ray refuses, so only the missing ones are added
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                                      "TOKENIZERS_PARALLELISM") if k in os.environ and k not in job_env.get("env_vars", {})}
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set by Ray for a submitted job
    if address:
        for key in ("num_cpus", "object_store_memory", "bind_host"):
            if getattr(cfg, key) is not None and key in cfg.model_fields_set:
                log.info("joining the Ray cluster at %s: ray.%s=%s (a local-cluster setting) is ignored",
                         address, key, getattr(cfg, key))
        ray.init(address=address, log_to_driver=True, **({"runtime_env": {"env_vars": env}} if env else {}))
    else:
        _local_ray(cfg, env)
        from raycompress.distributed.reaper import start

        start(os.getpid())  # a SIGKILLed driver takes its local Ray's processes with it
    log.info("ray resources: %s", ray.cluster_resources())


def is_loopback(host: str) -> bool:
    """`host` (an IP address or "localhost") names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


def free_port(host: str) -> int:
    """A TCP port nothing listens on at `host` now (the OS's choice). Another process may take
    it before the caller binds it; Ray's dashboard then refuses to start, naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _local_ray(cfg: RayConfig, env: dict[str, str]) -> None:
    """`ray.init` of a fresh local Ray bound to `cfg.bind_host`, dashboard on a free port.

    Ray 2.60 keeps every port of a node whose address is loopback on loopback: GCS, raylet, core
    workers and driver gRPC servers listen on 127.0.0.1 instead of all interfaces, the dashboard
    agent's gRPC, HTTP and metrics servers too (C++ `listen_to_localhost_only`; dashboard/agent.py,
    dashboard/head.py `is_localhost`). But `ray.init(_node_ip_address="127.0.0.1")` rewrites a
    loopback address into the machine's routable one (`services.resolve_ip_for_localhost`) unless
    `ray_constants.ENABLE_RAY_CLUSTER` is off, as it is on macOS and Windows; so it is turned off
    for the duration of this `ray.init` (it is read by `services.get_node_ip_address` only; once
    the node exists its address is the node's). Another `bind_host` is passed as the node's
    address; null leaves Ray its default (the routable address, every interface).
    """
    import ray
    from ray._private import ray_constants

    host = cfg.bind_host
    port = free_port("127.0.0.1")  # the dashboard's host: Ray's default, localhost
    env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    kwargs = {"num_cpus": cfg.num_cpus, "object_store_memory": cfg.object_store_memory, "log_to_driver": True,
              "dashboard_port": port, "runtime_env": {"env_vars": env}}
    if host is not None:
        kwargs["_node_ip_address"] = host
    loopback = host is not None and is_loopback(host)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    try:
        if loopback:
            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    log.info("local Ray on %s, dashboard/API at 127.0.0.1:%d", host or "this machine's address", port)


def cluster_nodes() -> list[dict]:
    """The alive nodes' resources (`ray.nodes()[i]["Resources"]`: CPU, GPU, memory in bytes, ...)."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


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
