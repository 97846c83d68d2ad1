"""Names of the actors a job starts, as Ray's dashboard and `ray list actors` show them.

Compression actors are `compress-0`, `compress-1`, ...; eval actors `eval-0`, ...; a replacement
started after a restart gets `-r<n>` (`compress-0-r1`), so it never waits for, or clashes with,
the name of an actor whose death the GCS has not yet seen. Selection's actors belong to Ray Data's
actor pool, which names its own. Names are unique per namespace: every actor of one job run lives
in `raycompress-<Ray job id>-<job name>`, so two drivers on one cluster never collide, however
they chose their own namespace, nor do the points of a sweep that one driver runs side by side
(each point is a job with its own name), while the names themselves stay short.
"""
from __future__ import annotations


def actor_namespace(job_name: str = "") -> str:
    """`raycompress-<Ray job id>[-<job_name>]` of this driver (e.g. `raycompress-02000000-smoke`).

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("actor_namespace() needs Ray to be initialised")
    base = f"raycompress-{ray.get_runtime_context().get_job_id()}"
    return f"{base}-{job_name}" if job_name else base


def actor_name(role: str, index: int, attempt: int = 0) -> str:
    """`<role>-<index>`, with `-r<attempt>` for a replacement (attempt > 0)."""
    return f"{role}-{index}" + (f"-r{attempt}" if attempt else "")


def name_options(role: str, index: int, attempt: int = 0, job_name: str = "") -> dict:
    """`.options()` keywords that name one actor of job `job_name`: {"name", "namespace"}."""
    return {"name": actor_name(role, index, attempt), "namespace": actor_namespace(job_name)}
