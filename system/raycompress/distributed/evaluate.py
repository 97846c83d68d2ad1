"""Evaluate stage on Ray: a pool of `EvalActor` actors, each loading a checkpoint once and
scoring work units of log-likelihood requests; the driver tokenizes, cuts units, aggregates.

Units are fixed before any actor starts (requests sorted by length, cut at `unit_tokens`), and an
actor scores a unit the same way wherever it runs, so 1 or K actors, or an actor that died and was
replaced (its unit re-run on the replacement), give the same numbers. Actors take GPUs when the
cluster has them, CPU otherwise; `evaluate.device_map: auto` loads a model too large for one
device across GPUs and CPU memory with accelerate.

Models are `ModelRef`s (a local folder, a URI or an alias): the driver reads only the tokenizer
and config (`ref.local(weights=False)`); each actor turns the reference into a local folder on its
own node (`ref.local()`, fetched once per node into the node cache), so no filesystem is shared.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path

import ray

from raycompress.config import JobConfig
from raycompress import chaos
from raycompress.distributed import metrics
from raycompress.distributed.naming import name_options
from raycompress.distributed.progress import ProgressLog
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.distributed.restarts import RestartBudget
from raycompress.evaluation.local import finalize_all, prepare_all
from raycompress.evaluation.scoring import Request, model_input
from raycompress.evaluation.taskfiles import resolve_tasks
from raycompress.models.fetch import ALIASES, RANDOM_PREFIX, ModelRef, resolve_model
from raycompress.storage import uri

log = logging.getLogger(__name__)




class EvalActor:
    """Holds one model; scores units of requests. All maths is in `evaluation.scoring`.

    Raises (from the constructor, as a Ray actor error):
        FileNotFoundError: the model's files cannot be found or fetched on this node.
    """

    def __init__(self, ref: ModelRef, threads: int, dtype: str, device_map: str | None) -> None:
        import torch

        from raycompress.models.load import load_causal_lm

        torch.set_num_threads(threads)
        folder = ref.local()  # this node's copy: read in place if local, else fetched into the node cache
        kwargs: dict = {}
        if device_map:
            import tempfile

            kwargs.update(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="raycompress-offload-"))
        self.model = load_causal_lm(folder, getattr(torch, dtype), **kwargs)  # quantized: fake-quantized as served
        if not device_map and torch.cuda.is_available():
            self.model.to("cuda")

    def score(self, unit: int, requests: list[Request], max_len: int,
              batch_tokens: int) -> tuple[list[tuple[float, bool]], float]:
        """((log-likelihood, greedy) per request, the seconds this actor spent scoring them)."""
        from raycompress.evaluation.scoring import loglikelihoods

        chaos.eval_point(unit)
        t0 = time.perf_counter()
        results = loglikelihoods(self.model, requests, max_len, batch_tokens)
        return results, time.perf_counter() - t0


def make_units(requests: list[Request], max_len: int, unit_tokens: int) -> list[list[int]]:
    """Request indices cut into units of about `unit_tokens` model-input tokens, longest first.

    Requests with the same model input stay in one unit (they share a forward pass there).
    """
    keys = [model_input(r, max_len) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (-len(keys[i]), keys[i]))
    units: list[list[int]] = []
    size = unit_tokens
    for pos, i in enumerate(order):
        same = pos > 0 and keys[order[pos - 1]] == keys[i]
        if size + len(keys[i]) > unit_tokens and not same:
            units.append([])
            size = 0
        units[-1].append(i)
        size += 0 if same else len(keys[i])
    return units


def run_pool(spawn, units: list[list[Request]], n_actors: int, call, max_restarts: int,
             on_unit=None) -> tuple[list[list], int]:
    """Score every unit on a pool of `n_actors` from `spawn(slot, generation)`; a dead actor is
    replaced (generation + 1) and its unit re-run. `call(actor, k, unit)` returns an ObjectRef;
    `on_unit(k, result)` is called as unit k's result arrives. Returns (result per unit, restarts).

    Raises:
        ray.exceptions.RayActorError: actors died more than `max_restarts` times.
        restarts.StageFailed: an actor's own code raised (a model that does not load, a bad
            request): not retried, since a replacement would raise it again.
    """
    from ray.exceptions import RayError

    actors = [spawn(slot, 0) for slot in range(min(n_actors, len(units)))]
    todo, inflight = deque(range(len(units))), {}
    results: list = [None] * len(units)
    budget = RestartBudget("evaluate", max_restarts)
    try:
        while todo or inflight:
            busy = {slot for slot, _ in inflight.values()}
            for slot in range(len(actors)):
                if slot not in busy and todo:
                    k = todo.popleft()
                    inflight[call(actors[slot], k, units[k])] = (slot, k)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, k = inflight.pop(ref)
            try:
                results[k] = ray.get(ref)
                if on_unit:
                    on_unit(k, results[k])
            except RayError as exc:
                budget.absorb(exc, f"eval-{slot} unit {k}")  # raises unless the actor died and a restart is left
                ray.kill(actors[slot])
                actors[slot] = spawn(slot, budget.used)
                todo.appendleft(k)
    finally:
        for a in actors:
            ray.kill(a)
    return results, budget.used


def _context_length(model_dir: Path, tokenizer) -> int:
    from transformers import AutoConfig

    from raycompress.evaluation.scoring import model_max_length

    return model_max_length(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), tokenizer)


def score_model(job: JobConfig, ref: ModelRef, requests: list[Request], max_len: int,
                label: str = "model") -> tuple[list, int, list[float]]:
    """(log-likelihood, greedy) per request for one checkpoint, the actor restarts it took, and
    the actor seconds per request (a unit's scoring time shared evenly among its requests).

    Progress (requests done / total, ETA) is logged under `evaluate[label]` and recorded as
    metrics with tag model=`label`, with the job's name.

    Raises:
        ray.exceptions.RayActorError: actors died (or failed to load the model) more than
            `evaluate.max_actor_restarts` times.
    """
    ev = job.evaluate
    order = make_units(requests, max_len, ev.unit_tokens)
    env = chaos.env_vars()
    opts = {**actor_options(job.ray), **({"runtime_env": {"env_vars": env}} if env else {})}
    actor_cls = ray.remote(EvalActor)

    def spawn(slot: int, generation: int):  # eval-<slot> in the job's namespace, -r<n> for a replacement
        return actor_cls.options(**name_options("eval", slot, generation, job.name), **opts).remote(
            ref, torch_threads(job.ray), ev.dtype, ev.device_map)

    call = lambda a, k, unit: a.score.remote(k, unit, max_len, ev.batch_tokens)  # noqa: E731
    progress = ProgressLog(f"evaluate[{label}]", len(requests), "requests")
    metrics.record("raycompress_eval_requests_total", len(requests), job.name, model=label)

    def on_unit(k: int, result: tuple) -> None:
        progress.update(len(order[k]))
        metrics.record("raycompress_eval_requests_done", len(order[k]), job.name, model=label)
        metrics.record("raycompress_tokens", sum(len(model_input(requests[i], max_len)) for i in order[k]), job.name,
                       stage="evaluate", model=label)

    try:
        per_unit, restarts = run_pool(spawn, [[requests[i] for i in u] for u in order], job.ray.eval_actors,
                                      call, ev.max_actor_restarts, on_unit)
    finally:
        progress.close()
    out: list = [None] * len(requests)
    seconds = [0.0] * len(requests)
    for idx, (res, unit_s) in zip(order, per_unit):
        for i, r in zip(idx, res):
            out[i], seconds[i] = r, unit_s / len(idx)
    return out, restarts, seconds


def _as_ref(job: JobConfig, model: ModelRef | str | os.PathLike) -> ModelRef:
    """`model` as a ModelRef: a plain location is taken relative to the job's base_dir."""
    if isinstance(model, ModelRef):
        return model
    spec = str(model)
    if spec.startswith(RANDOM_PREFIX):
        return resolve_model(spec, job.base_dir, job.storage.cache_dir)
    return ModelRef(spec if spec in ALIASES else job.resolve(spec), job.storage.cache_dir)


def check_models(models: dict[str, ModelRef]) -> None:
    """Fail fast, before any work, when a model's location has no config.json (aliases are
    converted on demand and not checked).

    Raises:
        FileNotFoundError: naming the model's label and location (without its URI query).
    """
    for label, ref in models.items():
        if not ref.is_alias and not uri.is_file(uri.join(ref.location, "config.json")):
            raise FileNotFoundError(f"model '{label}': {uri.display(ref.location)} has no config.json")


def evaluate_models(job: JobConfig, models: dict[str, ModelRef | str | os.PathLike]) -> dict:
    """Score every task of the job on every model, with the same requests.

    Args:
        models: {label: ModelRef}; a plain path, URI or alias is accepted too (made a ModelRef
            with `job.storage.cache_dir`, a relative path against `job.base_dir`).
    Returns:
        {label: {"seconds": wall s, "restarts": int, "tasks": {name: record}, "groups": {name: record}}}
        (records as `finalize_task` / `group_results` write them).
    Raises:
        FileNotFoundError: a model's location has no config.json (named with its label), or a
            task's data file cannot be read.
        TaskError: a task file or the job's task list is wrong (named file and field).
        ray.exceptions.RayActorError: eval actors died more than `evaluate.max_actor_restarts` times.
    """
    from transformers import AutoTokenizer

    refs = {label: _as_ref(job, m) for label, m in models.items()}
    check_models(refs)
    tasks = resolve_tasks(job)
    first = next(iter(refs.values())).local(weights=False)  # config + tokenizer on the driver's node
    tokenizer = AutoTokenizer.from_pretrained(first, trust_remote_code=False)
    max_len = _context_length(first, tokenizer)
    prepared, requests = prepare_all(tasks, tokenizer, max_len, job.resolve)
    log.info("evaluate: %d tasks, %d requests, context length %d", len(tasks), len(requests), max_len)
    out: dict[str, dict] = {}
    for label, ref in refs.items():
        t0 = time.perf_counter()
        results, restarts, seconds = score_model(job, ref, requests, max_len, label)
        scored = finalize_all(prepared, results)
        out[label] = {"seconds": time.perf_counter() - t0, "restarts": restarts, **scored}
        _log_tasks(label, prepared, scored["tasks"], seconds)
        log.info("evaluate[%s]: %.1f s", label, out[label]["seconds"])
    return out


def _log_tasks(label: str, prepared: list, records: dict, seconds: list[float]) -> None:
    """One line per evaluated task: its metrics, n, and the actor seconds its requests took."""
    start = 0
    for p in prepared:
        task_s = sum(seconds[start : start + len(p.requests)])
        start += len(p.requests)
        rec = records[p.cfg.name]
        values = " ".join(f"{m}={v:.4g}" for m, v in rec.get("metrics", {}).items() if v is not None)
        log.info("task %s [%s]: %s n=%s seconds=%.1f", p.cfg.name, label, values, rec.get("n"), task_s)
